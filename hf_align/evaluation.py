"""Does it align? Mean reward, win rate, KL to a reference, retain perplexity and generation length.

The numbers ``hf-align eval`` and ``benchmarks/fidelity.py`` report, as library functions:

* :func:`sample` — seeded, batched temperature sampling (:mod:`hf_align.generation`).
* :func:`resolve_reward_funcs` — ``"testbed"``, ``"package.module:function"`` or a reward model
  (:mod:`hf_align.rewards`: the same resolution and reward-model scoring as the feedback trainer's).
* :func:`score_completions` — rewards as TRL's GRPO ``reward_funcs`` see them (summed over functions).
* :func:`win_rate` — policy vs reference rewards on the same prompts (ties count one half).
* :func:`sequence_kl` — KL(πθ‖π_ref) estimated on the policy's samples:
  mean over samples of Σ_t (log πθ(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)).
* :func:`perplexity` — exp(Σ NLL / #tokens) over the completion tokens of a retain set (corpus level).
* :func:`evaluate_model` — all of the above in one dictionary (what ``hf-align eval`` writes as JSON).

Perplexity is computed here rather than with ``evaluate.load("perplexity")``: that metric needs its
script from the Hub (unavailable offline) and loads the model itself from a model id, so it cannot
score an in-memory model, an adapter or a merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hf_align.generation import sample
from hf_align.rewards import RewardFunc, resolve_reward_funcs, reward_name, score_completions


# ------------------------------------------------------------------------------------------ comparisons
def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> dict[str, float | int]:
    """Pairwise comparison on the same prompts: wins, ties, losses and (wins + ties/2) / n."""
    if len(policy_rewards) != len(reference_rewards):
        raise ValueError(
            f"win_rate: {len(policy_rewards)} policy rewards vs {len(reference_rewards)} reference rewards."
        )
    if not policy_rewards:
        raise ValueError("win_rate: no rewards to compare.")
    wins = sum(p > r for p, r in zip(policy_rewards, reference_rewards))
    ties = sum(p == r for p, r in zip(policy_rewards, reference_rewards))
    n = len(policy_rewards)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": n - wins - ties}


# --------------------------------------------------------------------------------------------- sampling
def prompt_texts(prompts: Sequence[Any], tokenizer) -> list[str]:
    """Standard prompts unchanged; conversational ones through the chat template (with generation prompt)."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            out.append(prompt)
        elif isinstance(prompt, list):
            out.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        else:
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}; expected a string or a list of messages.")
    return out


# ------------------------------------------------------------------------------------- log-probabilities
def _encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str], add_eos: Sequence[bool]):
    """Token ids of prompt and completion (no special tokens except an optional EOS after the completion)."""
    rows = []
    for prompt, completion, eos in zip(prompts, completions, add_eos, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if eos:
            c = c + [tokenizer.eos_token_id]
        rows.append((p, c))
    return rows


def completion_logprobs(
    model, tokenizer, rows: Sequence[tuple[list[int], list[int]]], batch_size: int = 64
) -> list[torch.Tensor]:
    """Per-token log πθ(c_t | p, c_<t) for each (prompt ids, completion ids) row (fp32, on CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            length = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), length), dtype=torch.long)
            for j, (p, c) in enumerate(chunk):  # right padding: positions are the same as unpadded
                seq = p + c
                ids[j, : len(seq)] = torch.tensor(seq)
                attn[j, : len(seq)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1)
            token_logps = logps.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
            for j, (p, c) in enumerate(chunk):
                if not p:
                    raise ValueError("completion_logprobs: every row needs at least one prompt token.")
                out.append(token_logps[j, len(p) - 1 : len(p) - 1 + len(c)])
    finally:
        model.train(was_training)
    return out


def sequence_kl(
    model,
    reference_model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """KL(πθ‖π_ref) estimated on samples of πθ: mean over samples of Σ_t log πθ(y_t) − log π_ref(y_t).

    Completions are re-tokenized from their text; an EOS token is appended when the completion is
    shorter than ``max_new_tokens`` (generation stopped on EOS), so the termination is scored too.
    With a tokenizer whose encode∘decode is the identity on generated text (the testbed's), these are
    exactly the sampled tokens. A single-sample estimate: unbiased, but it can be negative.
    """
    add_eos = [
        max_new_tokens is None or len(tokenizer(c, add_special_tokens=False)["input_ids"]) < max_new_tokens
        for c in completions
    ]
    rows = _encode_pairs(tokenizer, prompts, completions, add_eos)
    policy = completion_logprobs(model, tokenizer, rows, batch_size)
    reference = completion_logprobs(reference_model, tokenizer, rows, batch_size)
    per_sample = [float((p - r).sum()) for p, r in zip(policy, reference)]
    mean = sum(per_sample) / len(per_sample)
    std = math.sqrt(sum((x - mean) ** 2 for x in per_sample) / max(len(per_sample) - 1, 1))
    return {"kl": mean, "kl_stderr": std / math.sqrt(len(per_sample))}


def perplexity(
    model,
    tokenizer,
    prompts: Sequence[str] | None,
    completions: Sequence[str],
    append_eos: bool = True,
    batch_size: int = 64,
) -> dict[str, float]:
    """Corpus perplexity exp(Σ NLL / #tokens) over completion tokens (given the prompt) plus EOS.

    ``prompts=None`` scores whole texts: every token after the first (a BOS is prepended when the
    tokenizer has one, so the first text token is scored too).
    """
    if prompts is None:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        rows = []
        for text in completions:
            ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids + ([tokenizer.eos_token_id] if append_eos else [])
            rows.append((ids[:1], ids[1:]))
    else:
        rows = _encode_pairs(tokenizer, prompts, completions, [append_eos] * len(completions))
    rows = [(p, c) for p, c in rows if c]
    if not rows:
        raise ValueError("perplexity: no tokens to score.")
    logps = completion_logprobs(model, tokenizer, rows, batch_size)
    total = -sum(float(lp.double().sum()) for lp in logps)
    count = sum(lp.numel() for lp in logps)
    nll = total / count
    return {"perplexity": math.exp(nll) if nll < 700 else math.inf, "nll": nll, "tokens": count}


# ------------------------------------------------------------------------------------------- together
def evaluate_model(
    model,
    tokenizer,
    prompts: Sequence[Any],
    reward_funcs: Sequence[RewardFunc] | None = None,
    reward_names: Sequence[str] | None = None,
    reference_model=None,
    retain: dict[str, Sequence[str] | None] | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 64,
    reward_columns: dict[str, Sequence[Any]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every metric of ``hf-align eval`` for one model; keys absent inputs would fill are ``None``.

    ``retain``: ``{"prompts": [...] or None, "completions": [...]}`` for :func:`perplexity`.
    ``reward_columns``: extra dataset columns passed to the reward functions as keyword arguments.
    """
    texts = prompt_texts(prompts, tokenizer)
    conversational = any(isinstance(p, list) for p in prompts)
    kwargs = dict(seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    completions = sample(model, tokenizer, texts, progress=progress, desc="sampling policy", **kwargs)
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    result: dict[str, Any] = {
        "num_prompts": len(texts),
        "mean_length": sum(lengths) / len(lengths),
        "mean_reward": None,
        "reward_std": None,
        "rewards": None,
        "reference_mean_reward": None,
        "win_rate": None,
        "wins": None,
        "ties": None,
        "losses": None,
        "kl": None,
        "kl_stderr": None,
        "perplexity": None,
        "retain_nll": None,
        "retain_tokens": None,
    }

    def rewards_of(samples: list[str]) -> tuple[list[float], list[list[float]]]:
        shown = [[{"role": "assistant", "content": s}] for s in samples] if conversational else samples
        return score_completions(reward_funcs, prompts, shown, names=reward_names, **(reward_columns or {}))

    if reward_funcs:
        totals, per_func = rewards_of(completions)
        mean = sum(totals) / len(totals)
        result["mean_reward"] = mean
        result["reward_std"] = math.sqrt(sum((x - mean) ** 2 for x in totals) / len(totals))
        names = list(reward_names) if reward_names else [reward_name(f) for f in reward_funcs]
        result["rewards"] = {n: sum(v) / len(v) for n, v in zip(names, per_func)}
    if reference_model is not None:
        ref_completions = sample(
            reference_model, tokenizer, texts, progress=progress, desc="sampling reference", **kwargs
        )
        if reward_funcs:
            ref_totals, _ = rewards_of(ref_completions)
            result["reference_mean_reward"] = sum(ref_totals) / len(ref_totals)
            result.update(win_rate(totals, ref_totals))
        kl = sequence_kl(model, reference_model, tokenizer, texts, completions, max_new_tokens, batch_size)
        result.update(kl)
    if retain is not None:
        ppl = perplexity(model, tokenizer, retain.get("prompts"), retain["completions"], batch_size=batch_size)
        result.update(perplexity=ppl["perplexity"], retain_nll=ppl["nll"], retain_tokens=ppl["tokens"])
    result["samples"] = [{"prompt": p, "completion": c} for p, c in zip(texts[:5], completions[:5])]
    return result


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a two-column text table (``None`` shown as ``-``)."""
    rows = [
        ("prompts", result.get("num_prompts")),
        ("mean reward", result.get("mean_reward")),
        ("reward std", result.get("reward_std")),
        ("reference mean reward", result.get("reference_mean_reward")),
        ("win rate vs reference", result.get("win_rate")),
        (
            "wins / ties / losses",
            None if result.get("wins") is None else f"{result['wins']} / {result['ties']} / {result['losses']}",
        ),
        ("KL(policy || reference)", result.get("kl")),
        ("retain perplexity", result.get("perplexity")),
        ("mean generation length (tokens)", result.get("mean_length")),
    ]
    for name, value in (result.get("rewards") or {}).items():
        if len(result["rewards"]) > 1:
            rows.insert(2, (f"  reward {name}", value))

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    width = max(len(n) for n, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{n:<{width}}  {fmt(v)}" for n, v in rows]
    return "\n".join(lines)


__all__ = [
    "completion_logprobs",
    "evaluate_model",
    "format_table",
    "perplexity",
    "prompt_texts",
    "resolve_reward_funcs",
    "sample",
    "score_completions",
    "sequence_kl",
    "win_rate",
]
