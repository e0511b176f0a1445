"""Sampling and scoring on the testbed: the numbers the quickstart, tests and benchmarks report."""

from __future__ import annotations

import random

import torch

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
    """Batched generation with left padding; returns decoded completions (special tokens removed)."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_k=0 if do_sample else None,
                    top_p=1.0 if do_sample else None,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        torch.random.set_rng_state(generator_state)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return outputs


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
