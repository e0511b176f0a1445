"""The fidelity report's judgement code (``benchmarks.fidelity``): lr choice, verdicts, prompt splits, AMA's front.

Hand-made summaries with hand-computed verdicts; the end-to-end run is tests/test_fidelity_smoke.py.
"""

import math

import pytest

from benchmarks.fidelity import allo, common
from benchmarks.fidelity import report as fidelity


def test_verdict_needs_the_stds_apart():
    assert common.verdict((0.50, 0.01), (0.40, 0.01)) == "shown"
    assert common.verdict((0.40, 0.01), (0.50, 0.01)) == "shown not to hold"
    assert common.verdict((0.50, 0.05), (0.45, 0.01)) == "not shown"  # 0.05 apart < 0.06 of stds
    assert common.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))


def test_prompt_splits_are_disjoint_and_the_test_prompts_are_the_evaluation_prompts():
    from hf_align.testbed.evaluation import eval_prompts

    test, heldout = common.prompt_splits(64, 32)
    assert test == eval_prompts(64, seed=1234) and len(heldout) == 32 and not set(test) & set(heldout)


def test_lr_choice_is_the_best_finite_heldout_reward():
    assert common.best_lr({"0.0003": 0.41, "0.001": 0.52, "0.003": 0.30}) == "0.001"
    assert common.best_lr({"0.0003": 0.41, "0.001": float("nan")}) == "0.0003"


def test_allo_pairs_exclude_the_evaluation_prompts():
    from hf_align import testbed

    tb = testbed.load()
    every = tb.preference_dataset(128, seed=100)
    banned = set(every["prompt"][:40])
    pairs = allo.preference_pairs(tb, 64, 0, banned)
    assert len(pairs) == 64 and not banned & set(pairs["prompt"])


def _summary(**rewards):
    keys = ("mean_reward", "win_rate", "kl", "perplexity")
    return {m: {k: (v if k == "mean_reward" else (1.0, 0.0)) for k in keys} for m, v in rewards.items()}


def test_allo_findings_judge_each_claim_from_the_numbers():
    cfg = allo.settings(quick=False)
    names = [v.name for v in allo.variants(cfg)]
    rewards = {m: (0.45, 0.01) for m in names}
    rewards.update(
        dpo=(0.40, 0.01), mask_top10=(0.50, 0.01), mask_random10=(0.40, 0.01), mask_bottom10=(0.40, 0.01),
        allo_forget=(0.45, 0.01), allo_epsilon=(0.51, 0.02), allo_full=(0.60, 0.01),
    )  # fmt: skip
    rewards["improve_ratio_0.4"] = (0.70, 0.01)  # a larger improving mask is clearly better
    lrs = {m: "0.001" for m in names} | {"dpo": "0.0001"}
    result = {
        "summary": _summary(**rewards), "runs": {"0": {}, "1": {}}, "start": {"test": {"mean_reward": 0.3, "perplexity": 2.0}},
        "settings": cfg, "lr": lrs, "forget_lr": 3e-4,
    }  # fmt: skip
    text = "\n".join(allo.findings(result))
    assert "top > random > bottom — shown." in text and "random > bottom: not shown" in text
    assert "alone match or beat full DPO — shown." in text
    assert "key-token NPO) helps the improving stage — shown not to hold." in text
    assert "token selection ε helps — not shown." in text  # 0.01 apart, stds 0.03 together
    assert "Full ALLO beats full DPO (the paper's headline) — shown." in text
    assert "A small improving mask (≤ 10 %) does as well as a larger one — shown not to hold." in text
    assert "A small forgetting mask (≤ 10 %) does as well as a larger one — shown." in text
    assert "edge of the sweep" in text and "dpo (0.0001)" in text and "forgetting stage" not in text
    result["runs"] = {"0": {}}
    assert "not shown (a single seed)" in "\n".join(allo.findings(result))


def test_ama_variant_is_judged_against_the_best_linear_alpha_at_no_higher_perplexity():
    linear = {
        "0.0": {"mean_reward": (0.50, 0.01), "perplexity": (3.0, 0.1)},
        "0.4": {"mean_reward": (0.48, 0.01), "perplexity": (2.1, 0.1)},
        "1.0": {"mean_reward": (0.36, 0.00), "perplexity": (2.4, 0.0)},
    }
    better = {"mean_reward": (0.52, 0.01), "perplexity": (2.2, 0.1)}  # reachable: α 0.4 (2.1 ≤ 2.2), not α 0 (3.0)
    assert fidelity._versus_front(linear, better) == ("0.4", "shown")
    # α 0.4 is 0.05 above the variant's perplexity, within its spread (0.1): still the comparison, not α 1
    close = {"mean_reward": (0.48, 0.01), "perplexity": (2.05, 0.1)}
    assert fidelity._versus_front(linear, close) == ("0.4", "not shown")
    worse = {"mean_reward": (0.40, 0.01), "perplexity": (2.0, 0.1)}  # below every α's ppl: the lowest, α 0.4
    assert fidelity._versus_front(linear, worse) == ("0.4", "shown not to hold")
    assert fidelity._dominated(linear) == (["0.0", "0.4", "1.0"], ["1.0"])


def _ama_run(seed, reward):
    point = {"mean_reward": reward, "perplexity": 2.0, "kl": 0.1, "win_rate": 0.5, "mean_length": 3.0}
    variants = [{"name": n, "mean_alpha": 0.3, **point} for n in ("partwise 0.4|0.3|0.2", "partwise 0.2|0.3|0.4")]
    variants += [
        {"name": f"adaptive init {a}", "mean_alpha": a, "lr": "0.03", "block_alphas": [a, a, a], **point}
        for a in (0.2, 0.4)
    ]
    return {"seed": seed, "ama": [{"alpha": a, **point} for a in (0.0, 1.0)], "ama_variants": variants}


def test_a_section_that_did_not_finish_is_left_out_not_replaced_by_an_older_json(tmp_path):
    (tmp_path / "fidelity_allo.json").write_text("{}")  # an older run's file: must not be read
    cfg = {**fidelity.settings(quick=False), "sections": ["allo", "feedback"], "seeds": [0, 1], "seed_sets": [[0, 1]]}
    runs = [_ama_run(0, 0.40), _ama_run(1, 0.44)]
    report = fidelity.write_report(runs, cfg, False, 60.0, tmp_path, 2, finished=[])
    assert report["sections"] == {} and "Section `allo` did not finish" in report["markdown"]
    assert report["summary"]["ama"]["seeds 0–1"]["0.0"]["mean_reward"][0] == pytest.approx(0.42)
