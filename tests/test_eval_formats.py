"""``hf-align eval`` takes every data format the trainers take, and reports each reward by name (issue #30, part 4).

Every number is checked against a forward pass written out here, never against hf_align.evaluation itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from hf_align import testbed
from hf_align.cli import main as cli_main
from hf_align.evaluation import eval_prompts, evaluate_model, retain_perplexity, sample


@pytest.fixture(scope="module")
def tb():
    return testbed.load()


def _nll(model, ids: list[int], start: int) -> tuple[float, int]:
    """Σ −log p(ids[t] | ids[:t]) for t ≥ start, one unbatched forward; and the number of tokens."""
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return -sum(float(logps[t - 1, ids[t]]) for t in range(start, len(ids))), len(ids) - start


def _corpus_ppl(parts: list[tuple[float, int]]) -> float:
    return math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))


PAIRS = [("1+2=", "3"), ("rev 12=", "21"), ("4+4=", "8")]


def test_conversational_prompt_completion_retain_set(tb):
    tok = tb.tokenizer
    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _ in PAIRS],
            "completion": [[{"role": "assistant", "content": c}] for _, c in PAIRS],
        }
    )
    parts = []
    for p, c in PAIRS:
        prompt = tok(f"<|user|>{p}<|assistant|>", add_special_tokens=False)["input_ids"]
        full = tok(f"<|user|>{p}<|assistant|>{c}<|eos|>", add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt
        parts.append(_nll(tb.model, full, len(prompt)))  # the completion and the template's end-of-turn (EOS)
    result = retain_perplexity(tb.model, tok, data, "retain_dataset 'x'")
    assert result["perplexity"] == pytest.approx(_corpus_ppl(parts), rel=1e-5)
    assert result["tokens"] == sum(c for _, c in parts)


def test_conversational_language_modeling_retain_set(tb):
    tok = tb.tokenizer
    messages = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in PAIRS]
    parts = []
    for p, c in PAIRS:
        ids = [tok.bos_token_id] + tok(f"<|user|>{p}<|assistant|>{c}<|eos|>", add_special_tokens=False)["input_ids"]
        parts.append(_nll(tb.model, ids, 1))  # after a BOS; the template's EOS ends it (no second EOS)
    result = retain_perplexity(tb.model, tok, Dataset.from_dict({"messages": messages}), "retain_dataset 'x'")
    assert result["perplexity"] == pytest.approx(_corpus_ppl(parts), rel=1e-5)


@pytest.mark.parametrize("implicit", [False, True])
def test_preference_retain_set_scores_the_chosen_completion(tb, implicit):
    tok = tb.tokenizer
    if implicit:  # conversational with the prompt inside chosen/rejected, as TRL's DPO accepts it
        data = Dataset.from_dict(
            {
                "chosen": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in PAIRS],
                "rejected": [
                    [{"role": "user", "content": p}, {"role": "assistant", "content": "0"}] for p, _ in PAIRS
                ],
            }
        )
        texts = [(f"<|user|>{p}<|assistant|>", f"{c}<|eos|>") for p, c in PAIRS]
    else:
        data = Dataset.from_dict(
            {"prompt": [p for p, _ in PAIRS], "chosen": [c for _, c in PAIRS], "rejected": ["0"] * 3}
        )
        texts = [(p, c) for p, c in PAIRS]
    parts = []
    for p, c in texts:
        prompt = tok(p, add_special_tokens=False)["input_ids"]
        completion = tok(c, add_special_tokens=False)["input_ids"] + ([] if implicit else [tok.eos_token_id])
        parts.append(_nll(tb.model, prompt + completion, len(prompt)))
    result = retain_perplexity(tb.model, tok, data, "retain_dataset 'x'")
    assert result["perplexity"] == pytest.approx(_corpus_ppl(parts), rel=1e-5)


def test_standard_and_text_retain_sets_unchanged(tb):
    tok = tb.tokenizer
    data = Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "completion": [c for _, c in PAIRS]})
    parts = []
    for p, c in PAIRS:
        prompt = tok(p, add_special_tokens=False)["input_ids"]
        parts.append(
            _nll(tb.model, prompt + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(prompt))
        )
    assert retain_perplexity(tb.model, tok, data, "r")["perplexity"] == pytest.approx(_corpus_ppl(parts), rel=1e-5)
    texts = [p + c for p, c in PAIRS]
    parts = [
        _nll(tb.model, [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], 1)
        for t in texts
    ]
    result = retain_perplexity(tb.model, tok, Dataset.from_dict({"text": texts}), "r")
    assert result["perplexity"] == pytest.approx(_corpus_ppl(parts), rel=1e-5)


def test_retain_set_without_a_known_format_is_one_line_naming_it(tb):
    with pytest.raises(ValueError, match=r"retain_dataset 'x'.*\['question'\]") as caught:
        retain_perplexity(tb.model, tb.tokenizer, Dataset.from_dict({"question": ["a"]}), "retain_dataset 'x'")
    assert "\n" not in str(caught.value)


def test_prompts_from_every_prompt_format(tb):
    chat = [[{"role": "user", "content": p}] for p, _ in PAIRS]
    assert eval_prompts(Dataset.from_dict({"prompt": chat}), "prompt", "d")[0] == chat
    implicit = Dataset.from_dict(
        {
            "chosen": [m + [{"role": "assistant", "content": "1"}] for m in chat],
            "rejected": [m + [{"role": "assistant", "content": "0"}] for m in chat],
        }
    )
    prompts, columns = eval_prompts(implicit, "prompt", "d")
    assert prompts == chat and set(columns) == {"chosen", "rejected"}
    with pytest.raises(ValueError, match=r"d: .*'prompt'.*\['text'\]"):
        eval_prompts(Dataset.from_dict({"text": ["a"]}), "prompt", "d")


# ---- rewards by name -------------------------------------------------------------------------------------------


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_each_reward_by_name_and_the_sum_only_with_weights(tb):
    prompts = list(testbed.prompt_dataset(8)["prompt"])
    kwargs = dict(seed=5, max_new_tokens=4, batch_size=8)
    completions = sample(tb.model, tb.tokenizer, prompts, **kwargs)
    r1, r2 = testbed.reward(prompts, completions), length_reward(completions)

    def stats(values):
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))

    plain = evaluate_model(tb.model, tb.tokenizer, prompts, [testbed.reward, length_reward], **kwargs)
    assert set(plain["rewards"]) == {"reward", "length_reward"}
    assert (plain["rewards"]["reward"]["mean"], plain["rewards"]["reward"]["std"]) == pytest.approx(stats(r1))
    assert (plain["rewards"]["length_reward"]["mean"], plain["rewards"]["length_reward"]["std"]) == pytest.approx(
        stats(r2)
    )
    assert plain["mean_reward"] is None and plain["reward_std"] is None  # no weights: no sum of unlike rewards

    weighted = evaluate_model(
        tb.model, tb.tokenizer, prompts, [testbed.reward, length_reward], reward_weights=[2.0, 0.5], **kwargs
    )
    total = [2.0 * a + 0.5 * b for a, b in zip(r1, r2)]
    assert (weighted["mean_reward"], weighted["reward_std"]) == pytest.approx(stats(total))
    assert weighted["reward_weights"] == [2.0, 0.5]
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2 reward functions"):
        evaluate_model(
            tb.model, tb.tokenizer, prompts, [testbed.reward, length_reward], reward_weights=[1.0], **kwargs
        )

    single = evaluate_model(tb.model, tb.tokenizer, prompts, [testbed.reward], **kwargs)
    assert single["mean_reward"] == pytest.approx(stats(r1)[0])  # one reward: the sum is that reward


def test_win_rate_per_reward_against_the_reference(tb):
    prompts = list(testbed.prompt_dataset(8)["prompt"])
    result = evaluate_model(
        tb.model, tb.tokenizer, prompts, [testbed.reward, length_reward], reference_model=tb.model,
        seed=1, max_new_tokens=5,
    )  # fmt: skip
    for name in ("reward", "length_reward"):
        assert result["rewards"][name]["win_rate"] == 0.5 and result["rewards"][name]["ties"] == 8
        assert result["rewards"][name]["reference_mean"] == result["rewards"][name]["mean"]
    assert result["win_rate"] is None  # no weights, several rewards


def test_cli_conversational_retain_set_and_reward_weights(tmp_path, tb):
    retain = tmp_path / "retain.jsonl"
    with retain.open("w") as f:
        for p, c in PAIRS:
            row = {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "r.json"
    argv = ["eval", "--model_name_or_path", "testbed", "--dataset_name", "testbed:prompts", "--num_prompts", "8",
            "--max_new_tokens", "5", "--no_progress", "--output", str(out), "--retain_dataset", str(retain),
            "--reward", "testbed", "--reward", f"{__name__}.length_reward", "--reward_weights", "1", "0.25"]  # fmt: skip
    assert cli_main(argv) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["perplexity"] > 1 and metrics["retain_tokens"] == sum(len(c) + 1 for _, c in PAIRS)
    rewards = metrics["rewards"]
    assert metrics["mean_reward"] == pytest.approx(rewards["reward"]["mean"] + 0.25 * rewards["length_reward"]["mean"])


def test_cli_refuses_a_weight_count_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import hf_align.scripts.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["eval", "--model_name_or_path", "testbed", "--dataset_name", "testbed:prompts", "--reward", "testbed",
            "--reward_weights", "1", "2", "--output", str(tmp_path / "r.json")]  # fmt: skip
    assert cli_main(argv) == 2
    assert "reward_weights has 2 entries for 1 reward functions" in capsys.readouterr().err
