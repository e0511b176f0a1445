"""The real-model fidelity section's own logic (benchmarks/fidelity/real_model.py): disjoint splits, the checker's
key-token labels, equal-forget-rate reading, the verdicts and the report splice. The training runs themselves are
the examples' (tests/test_examples.py runs them in smoke mode)."""

from __future__ import annotations

import math
import re

import pytest

from benchmarks.fidelity import real_model as rm


def test_prompt_splits_are_disjoint_in_prompts_topics_and_numbers():
    task = rm.examples()
    splits = {name: rm.prompt_split(task, name, 60, seed=3) for name in ("train", "selection", "test")}
    texts = {name: {r["prompt"][0]["content"] for r in rows} for name, rows in splits.items()}
    assert not texts["train"] & texts["selection"] and not texts["train"] & texts["test"]
    assert not texts["selection"] & texts["test"]
    for name, (low, high) in {"train": (2, 49), "selection": (50, 74), "test": (75, 99)}.items():
        numbers = [int(n) for t in texts[name] if "plus" in t for n in re.findall(r"\d+", t)]
        assert numbers and min(numbers) >= low and max(numbers) <= high, name
    topics = {
        name: {re.search(r"Describe (.+) in at most", t).group(1) for t in texts[name] if "Describe" in t}
        for name in splits
    }
    assert not topics["selection"] & topics["test"] and not topics["train"] & topics["test"]


def test_fact_split_halves_without_overlap():
    facts = [{"country": str(i)} for i in range(7)]
    selection, test = rm.fact_split(facts)
    assert [f["country"] for f in selection + test] == [str(i) for i in range(7)]
    assert len(selection) == 3


def test_at_forget_rate_reads_the_first_evaluation_that_reaches_the_target():
    curve = [
        {"step": 4, "forget_rate": 0.2, "test_accuracy": 1.0},
        {"step": 8, "forget_rate": 0.5, "test_accuracy": 0.75},
        {"step": 12, "forget_rate": 1.0, "test_accuracy": 0.25},
    ]
    assert rm.at_forget_rate(curve, 0.5, "test_accuracy") == 0.75
    assert rm.at_forget_rate(curve, 0.4, "test_accuracy") == 0.75
    assert math.isnan(rm.at_forget_rate(curve[:1], 0.5, "test_accuracy"))


def _real_tokenizer():
    from transformers import AutoTokenizer

    from hf_align.testbed import real_model

    folder = real_model.model_dir()
    if not (folder / "tokenizer.json").is_file():
        import os

        if os.environ.get("CI"):
            raise FileNotFoundError(f"{folder} holds no converted model: CI must run `make real-model` first")
        pytest.skip(f"the real model is not converted at {folder} (make real-model)")
    return AutoTokenizer.from_pretrained(folder)


def _weighted_text(tokenizer, prompt: str, reply: str) -> str:
    """The completion tokens the labeler weights 1, decoded (the trainer's tokenization of the completion)."""
    from hf_align.key_tokens import completion_token_ids

    messages, response = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": reply}]
    weights = rm.key_token_weights(tokenizer)(messages, response)
    ids = completion_token_ids(tokenizer, messages, response)
    assert len(weights) == len(ids)
    return tokenizer.decode([i for i, w in zip(ids, weights) if w == 1.0])


def test_key_tokens_are_the_words_past_the_limit_and_the_wrong_number():
    tok = _real_tokenizer()
    assert _weighted_text(tok, "Describe tea in at most 3 words.", "Hot leaves steeped gently today").split() == [
        "gently",
        "today",
    ]
    assert _weighted_text(tok, "What is 20 plus 22? Reply with the number only.", "41").strip() == "41"
    # the right number followed by chatter: only the chatter is to blame
    assert _weighted_text(tok, "What is 20 plus 22? Reply with the number only.", "42 is the sum").split() == [
        "is",
        "the",
        "sum",
    ]


def _seed(allo_rewards: dict, knowledge: float = 0.8, jitter: float = 0.0) -> dict:
    variants = {n: {"lr": 1e-5, "reward": r + jitter, "knowledge": knowledge} for n, r in allo_rewards.items()}
    point = {"reward": 0.5 + jitter, "knowledge": 0.7}
    return {
        "before": {"reward": 0.3, "knowledge": 1.0},
        "variants": variants,
        "ama": {
            "aligned": {"reward": 0.6, "knowledge": 0.5},
            "linear": {
                "0.25": {"reward": 0.4, "knowledge": 0.9},
                "0.5": point,
                "0.75": {"reward": 0.35, "knowledge": 1},
            },
            "partwise": {"reward": 0.55 + jitter, "knowledge": 0.75},  # above α = 0.5 in both
            "adaptive": {"reward": 0.3 + jitter, "knowledge": 0.6},  # below α = 0.5 in both
        },
    }


def test_summary_verdicts_follow_the_separation_rule():
    rewards = {"dpo": 0.4, "lora": 0.45, "mask_top10": 0.6, "mask_random10": 0.7, "mask_bottom10": 0.59,
               "allo_full": 0.61}  # fmt: skip
    seeds = {str(i): _seed(rewards, jitter=0.01 * i) for i in range(3)}
    summary = rm.summarize({"allo": {"seeds": seeds, "chosen_lrs": {}}})
    verdicts = {c["claim"]: c["verdict"] for c in summary["claims"]}
    assert verdicts["top-10 % mask > full DPO (reward)"] == "shown"
    assert verdicts["top-10 % mask > random 10 %"] == "shown not to hold"
    assert verdicts["top-10 % mask > bottom 10 %"] == "not shown"  # 0.01 apart, stds 0.01 each
    assert verdicts["partwise merge above the linear front"] == "shown"
    assert verdicts["adaptive merge above the linear front"] == "shown not to hold"
    assert summary["allo"]["mask_top10"]["reward"] == pytest.approx((0.61, 0.01, 3))


def test_markdown_and_splice_keep_the_testbed_sections():
    rewards = {"dpo": 0.4, "lora": 0.45, "mask_top10": 0.6, "mask_random10": 0.5, "mask_bottom10": 0.45,
               "allo_full": 0.61}  # fmt: skip
    parts = {"allo": {"seeds": {"0": _seed(rewards)}, "chosen_lrs": {"dpo": 5e-6}}}
    result = {
        "summary": rm.summarize(parts), "parts": parts, "settings": {"seeds": [0]}, "wall_s": 60.0,
        "plot": "fidelity_real_model.png",
        "machine": {"cpus": 2, "jobs": 2, "threads": 1, "load_start": 0.1, "load_end": 2.0, "torch": "x"},
    }  # fmt: skip
    section = rm.markdown(result)
    assert section[0] == "## On a real model: SmolLM2-135M-Instruct"
    # one seed: the numbers, but no verdict (the rule needs a spread)
    assert "| top-10 % mask > full DPO (reward) | 0.600 vs 0.400 | **1 seed(s): no verdict** | shown |" in section
    report = "# Report\n\n## ALLO\n\ntestbed allo\n\n## Not shown here / caveats\n\n- c\n"
    once = rm.splice_section(report, section)
    assert once.index("## ALLO") < once.index(section[0]) < once.index("## Not shown here")
    section2 = [section[0], "", "new numbers"]
    twice = rm.splice_section(once, section2)
    assert "new numbers" in twice and "0.600 vs 0.400" not in twice
    assert twice.count(section[0]) == 1 and "testbed allo" in twice and "- c" in twice


def test_schedule_runs_first_seeds_first_and_skips_seeds_of_a_failed_sweep(tmp_path):
    """Later seeds rerun the lrs the first seed chose: they start only after it succeeded, never after it failed."""
    import sys

    log = tmp_path / "log"

    def command(part: str, seed: int) -> list[str]:
        code = 1 if (part, seed) == ("b", 0) else 0
        script = (f"import time; open({str(log)!r}, 'a').write('start {part} {seed}\\n'); time.sleep(0.3); "
                  f"open({str(log)!r}, 'a').write('end {part} {seed}\\n'); raise SystemExit({code})")  # fmt: skip
        return [sys.executable, "-c", script]

    codes = rm.schedule({"seeds": [0, 1, 2]}, ["a", "b"], 3, command)  # a free slot must not start a seed early
    assert codes == {"a/seed0": 0, "b/seed0": 1, "a/seed1": 0, "a/seed2": 0}
    events = log.read_text().split("\n")
    assert events.index("end a 0") < events.index("start a 1") and events.index("end a 0") < events.index("start a 2")
    assert not any(e.startswith("start b 1") or e.startswith("start b 2") for e in events)


def test_read_part_merges_a_part_file_and_seed_files(tmp_path):
    from hf_align.io import write_json

    write_json(rm.part_path(tmp_path, "quark", False, 0), {"seeds": {"0": {"x": 0}}, "chosen_lrs": {"quark": 1.0}})
    write_json(rm.part_path(tmp_path, "quark", False, 10), {"seeds": {"10": {"x": 10}}, "chosen_lrs": {"quark": 1.0}})
    write_json(rm.part_path(tmp_path, "quark", False, 2), {"seeds": {"2": {"x": 2}}, "chosen_lrs": {"quark": 1.0}})
    merged = rm.read_part(tmp_path, "quark", False)
    assert list(merged["seeds"]) == ["0", "2", "10"] and merged["chosen_lrs"] == {"quark": 1.0}
    assert rm.read_part(tmp_path, "allo", False) is None


def test_ga_and_npo_start_with_the_same_forget_to_retain_balance():
    """GA is token-level NPO at a tiny β; its forget gradient at Δ = 0 is β/2, so its retain weight must shrink by the
    same factor, or GA's forget term is drowned by the retain NLL (Adam ignores the common scale)."""
    import torch

    from hf_align.losses import npo_token_loss

    ratios = {}
    for method in ("npo", "ga"):
        loss = rm.unlearning_loss(method)
        delta = torch.zeros(1, 1, requires_grad=True)
        npo_token_loss(delta, torch.zeros(1, 1), torch.ones(1, 1), loss["beta"]).backward()
        ratios[method] = delta.grad.item() / loss["retain_weight"]
    assert ratios["ga"] == pytest.approx(ratios["npo"]) and ratios["npo"] == pytest.approx(0.05)
    assert rm.NPO_BETA["ga"] <= 1e-3  # σ(βΔ) ≈ ½ while Δ > -100: the β → 0 limit


def _machine(note: str = "") -> dict:
    return {"cpus": 2, "jobs": 2, "threads": 1, "load_start": 0.1, "load_end": 0.2, "torch": "x", "note": note}


def test_a_run_of_one_part_keeps_the_other_parts_of_the_section(tmp_path):
    """The workers' part files are not committed: ``--parts quark`` on a fresh clone must replace Quark only, and
    ``--rewrite`` must rebuild from the JSON alone."""
    from hf_align.io import read_json, write_json

    allo = {"seeds": {str(i): _seed({"dpo": 0.4, "lora": 0.45, "mask_top10": 0.6, "mask_random10": 0.5,
                                     "mask_bottom10": 0.45, "allo_full": 0.61}, jitter=0.01 * i) for i in range(3)},
            "chosen_lrs": {"dpo": 5e-6}, "part": "allo"}  # fmt: skip
    quark_seed = {"before": 0.2, "variants": {"quark": {"best_bin": 0.3, "worst_bin": 0.1, "unconditioned": 0.2}}}
    old_quark = {"seeds": {"0": quark_seed}, "chosen_lrs": {"quark": 1e-5}, "part": "quark"}
    previous = {"parts": {"allo": allo, "quark": old_quark}, "settings": {"seeds": [0, 1, 2]},
                "machine": _machine("first run"), "wall_s": 600.0}  # fmt: skip
    for seed in (0, 1):
        better = {**quark_seed, "variants": {"quark": {**quark_seed["variants"]["quark"], "best_bin": 0.5 + seed}}}
        write_json(rm.part_path(tmp_path, "quark", False, seed), {"seeds": {str(seed): better}, "chosen_lrs": {}})
    run = {"parts": ["quark"], "settings": {"seeds": [0, 1]}, "machine": _machine("quark run"), "wall_s": 60.0}
    result = rm.combine(tmp_path, False, run, previous)
    assert result["parts"]["allo"] == allo and list(result["parts"]["quark"]["seeds"]) == ["0", "1"]
    assert [r["parts"] for r in result["runs"]] == [["allo"], ["quark"]]
    assert result["summary"]["allo"]["mask_top10"]["reward"] == pytest.approx((0.61, 0.01, 3))
    header = rm.markdown(result)[2]
    assert "allo: 10 min wall" in header and "quark: 1 min wall" in header and "first run" in header
    assert read_json(tmp_path / "fidelity_real_model.json")["parts"].keys() == {"allo", "quark"}

    for stale in tmp_path.glob("fidelity_real_model.quark.seed*.json"):  # a fresh clone: only the section JSON
        stale.unlink()
    rewritten = rm.combine(tmp_path, False, {"parts": []}, previous=result)
    assert rewritten["parts"] == result["parts"] and rewritten["runs"] == result["runs"]
    failed = rm.combine(tmp_path, False, {**run, "parts": ["allo"]}, previous=result)  # its workers wrote nothing
    assert failed["parts"]["allo"] == allo and failed["runs"] == result["runs"]
