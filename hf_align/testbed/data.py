"""Datasets of the testbed task, generated deterministically from a seed.

Formats follow TRL: ``prompt``/``completion`` (SFT, forget, retain), ``prompt``/``chosen``/``rejected``
(preference), each in the *standard* (strings) or *conversational* (lists of messages) form.
"""

from __future__ import annotations

import random

from datasets import Dataset

from hf_align.testbed.task import FORGET_MARKER, corrupt, make_problem


# How the shipped model's pre-training data is mixed: this makes the model imperfect on purpose.
PRETRAIN_P_CORRECT = 0.4
PRETRAIN_P_FORGET = 0.25


def _text_columns(rows: list[dict], conversational: bool) -> Dataset:
    """Turn rows of strings into a Dataset; conversational wraps prompt as a user turn and the rest as assistant turns."""
    if not conversational:
        return Dataset.from_list(rows)
    converted = []
    for row in rows:
        new = {}
        for key, value in row.items():
            if key == "prompt":
                new[key] = [{"role": "user", "content": value}]
            elif key in ("completion", "chosen", "rejected"):
                new[key] = [{"role": "assistant", "content": value}]
            else:
                new[key] = value
        converted.append(new)
    return Dataset.from_list(converted)


def pretrain_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Noisy SFT rows used to pre-train the shipped model (right 40 % of the time, ``ugh`` 25 %)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = make_problem(rng)
        answer = problem.answer if rng.random() < PRETRAIN_P_CORRECT else corrupt(problem.answer, rng)
        if rng.random() < PRETRAIN_P_FORGET:
            answer += FORGET_MARKER
        rows.append({"prompt": problem.prompt, "completion": answer})
    return rows


def sft_dataset(n: int = 256, seed: int = 1, conversational: bool = False) -> Dataset:
    """Clean SFT data: correct answers, no forget marker."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = make_problem(rng)
        rows.append({"prompt": problem.prompt, "completion": problem.answer})
    return _text_columns(rows, conversational)


def prompt_dataset(n: int = 64, seed: int = 2, conversational: bool = False) -> Dataset:
    """Prompts for sampling (``prompt`` column only)."""
    rng = random.Random(seed)
    rows = [{"prompt": make_problem(rng).prompt} for _ in range(n)]
    return _text_columns(rows, conversational)


def preference_dataset(n: int = 256, seed: int = 3, conversational: bool = False) -> Dataset:
    """Pairs: ``chosen`` is the correct answer, ``rejected`` a same-length answer with wrong digits.

    The column ``rejected_wrong_positions`` lists the character positions of ``rejected`` that are
    wrong: ground truth for token-level labels.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = make_problem(rng)
        rejected = corrupt(problem.answer, rng)
        wrong = [i for i, (a, b) in enumerate(zip(problem.answer, rejected)) if a != b]
        rows.append(
            {
                "prompt": problem.prompt,
                "chosen": problem.answer,
                "rejected": rejected,
                "rejected_wrong_positions": wrong,
            }
        )
    return _text_columns(rows, conversational)


def forget_dataset(n: int = 128, seed: int = 4, conversational: bool = False) -> Dataset:
    """Completions showing the behaviour to unlearn: a correct answer followed by ``" ugh"``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = make_problem(rng)
        rows.append({"prompt": problem.prompt, "completion": problem.answer + FORGET_MARKER})
    return _text_columns(rows, conversational)


def retain_dataset(n: int = 128, seed: int = 5, conversational: bool = False) -> Dataset:
    """Behaviour to keep: correct answers without the marker (a different seed from ``sft_dataset``)."""
    return sft_dataset(n=n, seed=seed, conversational=conversational)
