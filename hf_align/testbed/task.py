"""The testbed task: small arithmetic / rule-following problems with a programmatic reward.

Every problem is a prompt such as ``"23+45="`` or ``"rev 3814="`` whose answer is a short digit
string. Because answers are digit strings and the testbed tokenizer splits digits into single
tokens, correctness is known *per token*: that is what the key-token methods (ALLO, rewrite-diff
labels) need as ground truth.

A "forget" behaviour is built in as well: some training responses end with the word ``ugh``.
Unlearning methods (NPO) should remove it while keeping the arithmetic (the "retain" set).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


FORGET_MARKER = " ugh"
"""Suffix that marks the behaviour the forget set teaches and NPO should unlearn."""

OPERATIONS = ("add", "rev")


@dataclass(frozen=True)
class Problem:
    """One task instance: what the model is asked and what it should answer."""

    prompt: str
    answer: str
    operation: str


def make_problem(rng: random.Random, operation: str | None = None) -> Problem:
    """Draw one problem. ``add``: two numbers below 50; ``rev``: reverse 3-5 digits."""
    operation = operation or rng.choice(OPERATIONS)
    if operation == "add":
        a, b = rng.randrange(50), rng.randrange(50)
        return Problem(f"{a}+{b}=", str(a + b), "add")
    if operation == "rev":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
        return Problem(f"rev {digits}=", digits[::-1], "rev")
    raise ValueError(f"Unknown operation {operation!r}; expected one of {OPERATIONS}.")


def solve(prompt: str) -> str:
    """The correct answer for a testbed prompt (raises ``ValueError`` for a prompt it cannot parse)."""
    body = prompt.strip()
    if not body.endswith("="):
        raise ValueError(f"Not a testbed prompt (must end with '='): {prompt!r}")
    body = body[:-1].strip()
    if body.startswith("rev "):
        digits = body[4:].strip()
        if not digits.isdigit():
            raise ValueError(f"Not a testbed prompt (rev takes digits): {prompt!r}")
        return digits[::-1]
    left, sep, right = body.partition("+")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit():
        raise ValueError(f"Not a testbed prompt: {prompt!r}")
    return str(int(left) + int(right))


def corrupt(answer: str, rng: random.Random, num_digits: int | None = None) -> str:
    """Same-length wrong answer: replace ``num_digits`` (default: at least one, random) digits."""
    positions = list(range(len(answer)))
    k = num_digits if num_digits is not None else rng.randint(1, len(answer))
    wrong = list(answer)
    for pos in rng.sample(positions, min(k, len(positions))):
        wrong[pos] = rng.choice([d for d in "0123456789" if d != answer[pos]])
    return "".join(wrong)


def _strip_response(completion: str) -> str:
    text = completion.strip()
    if text.endswith(FORGET_MARKER.strip()):
        text = text[: -len(FORGET_MARKER.strip())].strip()
    return text


def score(target: str, response: str) -> float:
    """Reward in [0, 1]: digits matching the target position by position, over the longer length.

    ``""`` and anything that is not a plain digit string score 0 at the offending positions, so a
    malformed answer gets partial credit only for its correct digits. The forget marker does not
    count (it is measured separately by :func:`has_forget_behaviour`).
    """
    text = _strip_response(response)
    if not text or not target:
        return 0.0
    matches = sum(1 for t, r in zip(target, text) if t == r and r.isdigit())
    return matches / max(len(target), len(text))


def reward(prompts: Sequence[str], completions: Sequence[str], **_: object) -> list[float]:
    """TRL-style reward function (``reward_funcs=[reward]``): one float in [0, 1] per completion.

    Accepts standard strings or conversational messages (the last message's content is scored).
    """
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        completion_text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(score(solve(prompt_text), completion_text))
    return out


def has_forget_behaviour(completion: str) -> bool:
    """Whether a response shows the behaviour the forget set teaches (the ``ugh`` suffix)."""
    return completion.rstrip().endswith(FORGET_MARKER.strip())


def token_correctness(target: str, token_strings: Sequence[str]) -> list[bool]:
    """Per-token correctness of a tokenized response (tokens decoded one by one, special tokens as ``""``).

    A token is wrong when it holds a digit that differs from the target digit at the same
    character position, a character beyond the target's length, or a non-digit character other
    than whitespace. Empty strings (EOS and other special tokens) are correct.
    """
    flags = []
    pos = 0
    for tok in token_strings:
        ok = True
        for ch in tok:
            if ch.isspace():
                continue
            if not ch.isdigit() or pos >= len(target) or target[pos] != ch:
                ok = False
            pos += 1
        flags.append(ok)
    return flags
