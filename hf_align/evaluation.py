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
* :func:`evaluate_model` — all of the above in one dictionary (what ``hf-align eval`` writes as JSON), each reward
  by name and their weighted sum only when weights are given (or there is one reward).
* :func:`eval_prompts` / :func:`retain_perplexity` — prompts and retain texts from every data format the trainers
  take (standard or conversational; language modeling, prompt-completion, preference), rendered as TRL renders them.

Perplexity is computed here rather than with ``evaluate.load("perplexity")``: that metric needs its
script from the Hub (unavailable offline) and loads the model itself from a model id, so it cannot
score an in-memory model, an adapter or a merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hf_align.errors import UserError
from hf_align.generation import sample, sample_ids
from hf_align.progress import progress_bar
from hf_align.rewards import RewardFunc, check_reward_weights, resolve_reward_funcs, score_completions


# ------------------------------------------------------------------------------------------ comparisons
def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> dict[str, float | int]:
    """Pairwise comparison on the same prompts: wins, ties, losses and (wins + ties/2) / n."""
    if len(policy_rewards) != len(reference_rewards):
        raise ValueError(
            f"win_rate: {len(policy_rewards)} policy rewards vs {len(reference_rewards)} reference rewards."
        )
    if not policy_rewards:
        raise ValueError("win_rate: no rewards to compare.")
    wins = sum(p > r for p, r in zip(policy_rewards, reference_rewards, strict=True))
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


RETAIN_FORMATS = (
    "a 'text' or 'messages' column, 'prompt' + 'completion', or 'chosen' (+ 'prompt') columns (strings or messages)"
)


def eval_prompts(dataset, prompt_column: str, source: str) -> tuple[list[Any], dict[str, list[Any]]]:
    """The prompts (strings or messages) and the other columns (for the reward functions) of a prompt set: a
    ``prompt_column``, or preference rows with the prompt inside ``chosen``/``rejected`` (TRL's implicit prompt)."""
    columns = list(dataset.column_names)
    if prompt_column in columns:
        return list(dataset[prompt_column]), {c: list(dataset[c]) for c in columns if c != prompt_column}
    if prompt_column == "prompt" and {"chosen", "rejected"} <= set(columns):
        from trl.data_utils import extract_prompt

        prompts = [extract_prompt({"chosen": c, "rejected": r})["prompt"] for c, r in
                   zip(dataset["chosen"], dataset["rejected"], strict=True)]  # fmt: skip
        return prompts, {c: list(dataset[c]) for c in columns}
    raise UserError(
        f"{source}: missing column(s) [{prompt_column!r}] (prompts as strings or messages, or 'chosen'/'rejected' "
        f"with the prompt inside them); found {columns}."
    )


def retain_format(columns: Sequence[str], source: str) -> str:
    """Which retain-set format ``columns`` hold (checked before any model is loaded), or a one-line error."""
    present = set(columns)
    if {"prompt", "completion"} <= present:
        return "prompt_completion"
    if "chosen" in present:
        return "preference"
    for kind in ("messages", "text"):
        if kind in present:
            return kind
    raise UserError(f"{source}: no retain texts; expected {RETAIN_FORMATS}; found {list(columns)}.")


def retain_texts(dataset, tokenizer, source: str) -> dict[str, Any]:
    """``{"prompts", "completions", "append_eos"}`` for :func:`perplexity` from any retain format: conversational
    rows through TRL's ``apply_chat_template`` (so the tokens scored are those SFT/NPO train on, the template's
    end-of-turn included and no EOS added); preference rows score the chosen completion."""
    from trl.data_utils import apply_chat_template, is_conversational, maybe_extract_prompt

    kind = retain_format(dataset.column_names, source)
    keys = {
        "prompt_completion": ("prompt", "completion"),
        "preference": ("prompt", "chosen", "rejected"),
        "messages": ("messages",),
        "text": ("text",),
    }[kind]
    rows = [{k: row[k] for k in keys if k in row} for row in dataset]
    conversational = bool(rows) and is_conversational(maybe_extract_prompt(rows[0]))
    if conversational:
        rows = [apply_chat_template(maybe_extract_prompt(row), tokenizer) for row in rows]
    if kind in ("messages", "text"):
        return {"prompts": None, "completions": [r["text" if conversational else kind] for r in rows],
                "append_eos": not conversational}  # fmt: skip
    completion = "completion" if kind == "prompt_completion" else "chosen"
    for i, row in enumerate(rows):
        if not all(isinstance(row.get(k), str) for k in ("prompt", completion)):
            raise UserError(f"{source}: row {i} has no text 'prompt' and {completion!r}; expected {RETAIN_FORMATS}.")
    return {"prompts": [r["prompt"] for r in rows], "completions": [r[completion] for r in rows],
            "append_eos": not conversational}  # fmt: skip


def retain_perplexity(model, tokenizer, dataset, source: str, batch_size: int = 64) -> dict[str, float]:
    """:func:`perplexity` of a retain set in any format the trainers take (:func:`retain_texts`)."""
    texts = retain_texts(dataset, tokenizer, source)
    return perplexity(model, tokenizer, texts["prompts"], texts["completions"], texts["append_eos"], batch_size)


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
    model,
    tokenizer,
    rows: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "log-probs",
) -> list[torch.Tensor]:
    """Per-token log πθ(c_t | p, c_<t) for each (prompt ids, completion ids) row (fp32, on CPU); ``progress``: a bar
    (``desc``, one step per sequence)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[torch.Tensor] = []
    try:
        with progress_bar(desc=desc, unit="seq", total=len(rows), enabled=progress) as bar:
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
                bar.update(len(chunk))
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
    progress: bool = False,
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
    policy = completion_logprobs(model, tokenizer, rows, batch_size, progress, desc="KL: policy log-probs")
    reference = completion_logprobs(reference_model, tokenizer, rows, batch_size, progress, "KL: reference log-probs")
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
    progress: bool = False,
) -> dict[str, float]:
    """Corpus perplexity exp(Σ NLL / #tokens) over completion tokens (given the prompt) plus EOS.

    ``prompts=None`` scores whole texts: every token after the first (a BOS is prepended when the
    tokenizer has one, so the first text token is scored too).
    """
    if prompts is None:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        rows = []
        for text in completions:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids if ids[:1] == bos else bos + ids  # a chat template may have written the BOS already
            ids = ids + ([tokenizer.eos_token_id] if append_eos else [])
            rows.append((ids[:1], ids[1:]))
    else:
        rows = _encode_pairs(tokenizer, prompts, completions, [append_eos] * len(completions))
    rows = [(p, c) for p, c in rows if c]
    if not rows:
        raise ValueError("perplexity: no tokens to score.")
    logps = completion_logprobs(model, tokenizer, rows, batch_size, progress, desc="retain perplexity")
    total = -sum(float(lp.double().sum()) for lp in logps)
    count = sum(lp.numel() for lp in logps)
    nll = total / count
    return {"perplexity": math.exp(nll) if nll < 700 else math.inf, "nll": nll, "tokens": count}


# ------------------------------------------------------------------------------------------- together
def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and (population) std over the values a reward function gave (``None`` = did not apply)."""
    given = [v for v in values if v is not None]
    if not given:
        return None, None
    mean = sum(given) / len(given)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in given) / len(given))


def _compare(policy: Sequence[float | None], reference: Sequence[float | None]) -> dict[str, Any]:
    """Reference mean and win rate over the prompts where both samples got a reward."""
    pairs = [(p, r) for p, r in zip(policy, reference, strict=True) if p is not None and r is not None]
    if not pairs:
        return {"reference_mean": None, "win_rate": None, "wins": None, "ties": None, "losses": None}
    return {"reference_mean": _stats([r for _, r in pairs])[0], **win_rate(*zip(*pairs))}


def evaluate_model(
    model,
    tokenizer,
    prompts: Sequence[Any],
    reward_funcs: Sequence[RewardFunc] | None = None,
    reward_names: Sequence[str] | None = None,
    reference_model=None,
    retain: dict[str, Any] | Any | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 64,
    reward_columns: dict[str, Sequence[Any]] | None = None,
    progress: bool = False,
    reward_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Every metric of ``hf-align eval`` for one model; keys absent inputs would fill are ``None``.

    Rewards: each function under ``rewards[name]`` (mean, std and, with a reference, its win rate). Their weighted
    sum (``mean_reward``, ``win_rate``, ...) only when ``reward_weights`` are given or there is one function:
    unlike rewards are not added up unasked. Reward functions are called as TRL's GRPO calls them (conversational
    completions as messages, ``completion_ids``, the dataset's ``reward_columns`` as keyword arguments).
    ``retain``: a retain dataset in any format the trainers take (:func:`retain_texts`), or
    ``{"prompts": [...] or None, "completions": [...]}`` for :func:`perplexity`.
    """
    funcs = list(reward_funcs or [])
    names = list(reward_names) if reward_names else resolve_reward_funcs(funcs)[1]
    if reward_weights is not None:
        reward_weights = check_reward_weights(reward_weights, len(funcs))
    summed = bool(funcs) and (reward_weights is not None or len(funcs) == 1)
    texts = prompt_texts(prompts, tokenizer)
    conversational = any(isinstance(p, list) for p in prompts)
    kwargs = dict(seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    completion_ids = sample_ids(model, tokenizer, texts, progress=progress, desc="sampling policy", **kwargs)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    result: dict[str, Any] = {
        "num_prompts": len(texts),
        "mean_length": sum(lengths) / len(lengths),
        "mean_reward": None,
        "reward_std": None,
        "rewards": None,
        "reward_weights": reward_weights,
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

    def rewards_of(samples: list[str], ids: list[list[int]]):
        shown = [[{"role": "assistant", "content": s}] for s in samples] if conversational else samples
        columns = {**(reward_columns or {}), "completion_ids": ids}
        return score_completions(funcs, prompts, shown, names, reward_weights, **columns)

    if funcs:
        totals, per_func = rewards_of(completions, completion_ids)
        result["rewards"] = {}
        for name, values in zip(names, per_func, strict=True):
            mean, std = _stats(values)
            result["rewards"][name] = {"mean": mean, "std": std}
        if summed:
            result["mean_reward"], result["reward_std"] = _stats(totals)
    if reference_model is not None:
        ref_ids = sample_ids(reference_model, tokenizer, texts, progress=progress, desc="sampling reference", **kwargs)
        if funcs:
            ref_totals, ref_per_func = rewards_of(tokenizer.batch_decode(ref_ids, skip_special_tokens=True), ref_ids)
            for name, values, ref_values in zip(names, per_func, ref_per_func, strict=True):
                result["rewards"][name].update(_compare(values, ref_values))
            if summed:
                overall = _compare(totals, ref_totals)
                result["reference_mean_reward"] = overall.pop("reference_mean")
                result.update(overall)
        kl = sequence_kl(model, reference_model, tokenizer, texts, completions, max_new_tokens, batch_size, progress)
        result.update(kl)
    if retain is not None:
        if not isinstance(retain, dict):
            retain = retain_texts(retain, tokenizer, "retain dataset")
        ppl = perplexity(model, tokenizer, retain.get("prompts"), retain["completions"],
                         retain.get("append_eos", True), batch_size, progress)  # fmt: skip
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
    per_reward = []
    for name, stats in (result.get("rewards") or {}).items():
        per_reward.append((f"reward {name}", stats["mean"]))
        if stats.get("win_rate") is not None:
            per_reward.append(("  win rate vs reference", stats["win_rate"]))
    rows[1:1] = per_reward

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
    "eval_prompts",
    "evaluate_model",
    "format_table",
    "perplexity",
    "prompt_texts",
    "resolve_reward_funcs",
    "retain_format",
    "retain_perplexity",
    "retain_texts",
    "sample",
    "score_completions",
    "sequence_kl",
    "win_rate",
]
