"""Sampling and scoring on the testbed: the numbers the quickstart, tests and benchmarks report."""

from __future__ import annotations

import random

from hf_align.generation import generate_texts
from hf_align.testbed.task import has_forget_behaviour, make_problem, score, solve


def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    do_sample: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """Batched generation with left padding, seeded once; decoded completions (special tokens removed).

    The testbed's defaults (10 new tokens) over :func:`hf_align.generation.generate_texts`.
    """
    return generate_texts(
        model,
        tokenizer,
        prompts,
        seed=seed,
        batch_size=batch_size,
        do_sample=do_sample,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
    )


def eval_prompts(num_prompts: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_problem(rng).prompt for _ in range(num_prompts)]


def mean_reward(model, tokenizer, num_prompts: int = 256, seed: int = 1234, prompts: list[str] | None = None) -> dict:
    """Mean reward of one temperature-1 sample per prompt, greedy reward, exact and forget rates."""
    prompts = prompts if prompts is not None else eval_prompts(num_prompts, seed)
    sampled = generate_completions(model, tokenizer, prompts, do_sample=True, seed=seed)
    greedy = generate_completions(model, tokenizer, prompts, do_sample=False)
    targets = [solve(p) for p in prompts]
    rewards = [score(t, c) for t, c in zip(targets, sampled)]
    return {
        "num_prompts": len(prompts),
        "sample_seed": seed,
        "mean_reward": sum(rewards) / len(rewards),
        "greedy_reward": sum(score(t, c) for t, c in zip(targets, greedy)) / len(prompts),
        "exact_rate": sum(r == 1.0 for r in rewards) / len(rewards),
        "forget_rate": sum(has_forget_behaviour(c) for c in sampled) / len(sampled),
    }
