"""hf_align.evaluation and ``hf-align eval``: numbers against hand computations on the testbed."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from hf_align import testbed
from hf_align.cli import main as cli_main
from hf_align.evaluation import (
    evaluate_model,
    perplexity,
    resolve_reward_funcs,
    sample,
    sequence_kl,
    win_rate,
)


@pytest.fixture(scope="module")
def tb():
    return testbed.load()


@pytest.fixture(scope="module")
def perturbed(tb):
    """The testbed model with small Gaussian noise on every weight: a different but related policy."""
    model = copy.deepcopy(tb.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _hand_logprob(model, tokenizer, prompt: str, completion_ids: list[int]) -> float:
    """Σ log p(completion token | prefix), one unbatched forward, no padding."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logps[len(prompt_ids) - 1 + t, tok]) for t, tok in enumerate(completion_ids))


def test_win_rate_hand_case():
    assert win_rate([1.0, 0.5, 0.2, 0.9], [0.5, 0.5, 0.9, 0.1]) == {
        "win_rate": 0.625,
        "wins": 2,
        "ties": 1,
        "losses": 1,
    }
    assert win_rate([0.0, 0.0], [1.0, 0.0])["win_rate"] == 0.25
    with pytest.raises(ValueError, match="2 policy rewards vs 1 reference"):
        win_rate([1.0, 0.0], [1.0])


def test_kl_is_zero_for_identical_models(tb):
    prompts = list(testbed.prompt_dataset(16)["prompt"])
    completions = sample(tb.model, tb.tokenizer, prompts, seed=3, max_new_tokens=10)
    kl = sequence_kl(tb.model, copy.deepcopy(tb.model), tb.tokenizer, prompts, completions, max_new_tokens=10)
    assert kl["kl"] == 0.0 and kl["kl_stderr"] == 0.0


def test_kl_matches_hand_sum_of_log_ratios_over_sampled_tokens(tb, perturbed):
    """The estimate is the mean of Σ_t log πθ − log π_ref over the tokens model.generate actually drew."""
    tok = tb.tokenizer
    prompts = list(testbed.prompt_dataset(12)["prompt"])
    completions = sample(perturbed, tok, prompts, seed=5, max_new_tokens=10, batch_size=64)
    # The sampled token ids, straight from generate with the same seed/padding as testbed.generate_completions.
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(5)
    with torch.no_grad():
        out = perturbed.generate(
            **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
    hand = []
    for i, prompt in enumerate(prompts):
        ids = out[i, enc["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id) + 1]
        assert tok.decode(ids, skip_special_tokens=True) == completions[i]
        hand.append(_hand_logprob(perturbed, tok, prompt, ids) - _hand_logprob(tb.model, tok, prompt, ids))
    kl = sequence_kl(perturbed, tb.model, tok, prompts, completions, max_new_tokens=10, batch_size=5)
    assert kl["kl"] == pytest.approx(sum(hand) / len(hand), abs=1e-4)
    assert abs(kl["kl"]) > 1e-3  # the models differ, so the check above is not 0 == 0


def test_perplexity_is_exp_of_mean_token_nll(tb, perturbed):
    tok = tb.tokenizer
    retain = testbed.retain_dataset(10)
    nll, count = 0.0, 0
    for prompt, completion in zip(retain["prompt"], retain["completion"]):
        ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        nll -= _hand_logprob(perturbed, tok, prompt, ids)
        count += len(ids)
    result = perplexity(perturbed, tok, retain["prompt"], retain["completion"], batch_size=3)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)

    # Whole texts: HF's own causal-LM loss (mean NLL of tokens 2..n) on one text with BOS prepended.
    text = "12+30=42"
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = perturbed(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert perplexity(perturbed, tok, None, [text], append_eos=False)["perplexity"] == pytest.approx(
        math.exp(float(loss)), rel=1e-5
    )


def test_mean_reward_matches_testbed_protocol(tb):
    """One batch, seed s: the same samples and mean reward as testbed.mean_reward with seed s."""
    prompts = list(testbed.prompt_dataset(40)["prompt"])
    funcs, names = resolve_reward_funcs("testbed")
    result = evaluate_model(tb.model, tb.tokenizer, prompts, funcs, names, seed=7, max_new_tokens=10)
    reference = tb.mean_reward(prompts=prompts, seed=7)
    assert result["mean_reward"] == pytest.approx(reference["mean_reward"], abs=1e-12)
    assert result["kl"] is None and result["perplexity"] is None  # nothing to compute them from


def test_reward_resolution_and_bad_names():
    funcs, names = resolve_reward_funcs(["testbed", "hf_align.testbed:reward"])
    assert names == ["reward", "reward_2"]
    assert funcs[0](["2+3="], ["5"]) == [1.0] and funcs[1](["rev 12="], ["20"]) == [0.5]
    with pytest.raises(ValueError, match="unknown reward 'nosuch'.*testbed.*package.module:function"):
        resolve_reward_funcs("nosuch")
    with pytest.raises(ValueError, match="reward 'no_such_module:f' cannot be imported"):
        resolve_reward_funcs("no_such_module:f")


def _eval(tmp_path, name: str, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / name
    argv = ["eval", "--model_name_or_path", "testbed", "--dataset_name", "testbed:prompts", "--num_prompts", "24"]
    argv += ["--max_new_tokens", "10", "--batch_size", "16", "--disable_tqdm", "--output_file", str(out), *extra]
    code = cli_main(argv)
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_cli_end_to_end_and_reproducible(tmp_path, tb, perturbed, capsys):
    ref_dir = tmp_path / "perturbed"
    perturbed.save_pretrained(ref_dir)
    tb.tokenizer.save_pretrained(ref_dir)
    extra = ["--reward", "testbed", "--reference_model", str(ref_dir), "--retain_dataset_name", "testbed:retain"]
    extra += ["--num_retain", "20", "--seed", "11"]
    code, first = _eval(tmp_path, "a.json", *extra)
    assert code == 0
    printed = capsys.readouterr().out
    assert "win rate vs reference" in printed and "retain perplexity" in printed
    code, again = _eval(tmp_path, "b.json", *extra)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    _, other_seed = _eval(tmp_path, "c.json", "--reward", "testbed", "--seed", "12")  # policy samples only
    assert other_seed["metrics"]["mean_reward"] != first["metrics"]["mean_reward"]

    # The numbers are those of the library functions on the same inputs (batches of 16: seeds 11, 12).
    m = first["metrics"]
    prompts = list(testbed.prompt_dataset()["prompt"])[:24]
    policy = sample(tb.model, tb.tokenizer, prompts, seed=11, max_new_tokens=10, batch_size=16)
    ref = sample(perturbed, tb.tokenizer, prompts, seed=11, max_new_tokens=10, batch_size=16)
    rewards, ref_rewards = testbed.reward(prompts, policy), testbed.reward(prompts, ref)
    assert m["mean_reward"] == pytest.approx(sum(rewards) / 24)
    assert m["reference_mean_reward"] == pytest.approx(sum(ref_rewards) / 24)
    assert m["win_rate"] == pytest.approx(win_rate(rewards, ref_rewards)["win_rate"])
    assert m["kl"] == pytest.approx(sequence_kl(tb.model, perturbed, tb.tokenizer, prompts, policy, 10)["kl"])
    retain = testbed.retain_dataset().select(range(20))
    assert m["perplexity"] == pytest.approx(
        perplexity(tb.model, tb.tokenizer, retain["prompt"], retain["completion"])["perplexity"]
    )
    lengths = [len(tb.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in policy]
    assert m["mean_length"] == pytest.approx(sum(lengths) / 24)


def test_cli_adapter_defaults_reference_to_base(tmp_path, tb):
    """An untrained LoRA (B = 0) is the base model: KL exactly 0, every comparison a tie."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(tb.model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    code, result = _eval(tmp_path, "r.json", "--adapter", str(tmp_path / "adapter"), "--reward", "testbed")
    assert code == 0
    assert result["reference_model"] == "testbed (no adapter)"
    assert result["metrics"]["kl"] == 0.0
    assert result["metrics"]["ties"] == 24 and result["metrics"]["win_rate"] == 0.5


def test_cli_bad_inputs(tmp_path, capsys):
    code, result = _eval(tmp_path, "x.json", "--reward", "nosuch")
    assert code == 2 and result is None
    assert "unknown reward 'nosuch'" in capsys.readouterr().err
    code, _ = _eval(tmp_path, "x.json", "--reward", "testbed", "--prompt_column", "question")
    err = capsys.readouterr().err
    assert code == 2 and "missing column(s) ['question']" in err and "dataset_name 'testbed:prompts'" in err
    code, _ = _eval(tmp_path, "x.json", "--reward", "testbed", "--retain_dataset_name", "testbed:prompts")
    err = capsys.readouterr().err
    assert code == 2 and "retain_dataset_name 'testbed:prompts'" in err and "'completion'" in err
    code, _ = _eval(tmp_path, "x.json", "--reward", "testbed", "--dataset_name", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl" in capsys.readouterr().err
