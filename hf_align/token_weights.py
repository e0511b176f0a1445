"""Per-token weights for preference and completion data: one home for building, checking and applying them.

Convention (DESIGN.md): a dataset may carry ``chosen_weights`` / ``rejected_weights`` (preference data) or
``completion_weights`` (prompt-completion data): one non-negative float per **completion token under the
trainer's own tokenization**, i.e. exactly the ``chosen_ids`` / ``rejected_ids`` / ``completion_ids`` that TRL's
``_prepare_dataset`` produces (completion = tokens after the common prefix of the tokenized prompt and
prompt+completion).

The EOS the trainer adds. For standard (non-conversational) data TRL appends the EOS *text* to the completion, so the
last completion token is EOS; for conversational data the chat template adds its own closing tokens. A weight list
may therefore have

* ``n`` entries (``n = len(completion_ids)``): the weights of every token, EOS/template tokens included; or
* ``n - 1`` entries when the last completion token is the tokenizer's EOS: the EOS then gets ``eos_token_weight``
  (default 1.0, i.e. EOS counts like an ordinary token, as in unweighted DPO).

Anything else is an error naming the column and the row. :func:`weights_from_char_spans` always returns ``n``
entries (tokens the trainer adds outside the completion text get ``special``, default 1.0).

The sequence score is ``Σ_t w_t · log π(y_t | x, y_<t)``, for the policy and for the reference alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch


WEIGHT_COLUMNS: dict[str, str] = {
    "chosen_weights": "chosen",
    "rejected_weights": "rejected",
    "completion_weights": "completion",
}
"""Weight column -> the text column whose tokens it weighs."""


# --------------------------------------------------------------------------------------------------------------
# Checking


def check_weight_columns(column_names: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """Return the weight columns present; raise if one lacks its text column or does not belong to this trainer.

    ``allowed`` lists the weight columns the calling trainer understands (e.g. ``chosen_weights`` and
    ``rejected_weights`` for DPO).
    """
    present = [name for name in WEIGHT_COLUMNS if name in column_names]
    for name in present:
        if name not in allowed:
            raise ValueError(
                f"The dataset has a {name!r} column, but this trainer only reads {sorted(allowed)}. Rename or drop it."
            )
        text = WEIGHT_COLUMNS[name]
        if text not in column_names:
            raise ValueError(
                f"The dataset has a {name!r} column but no {text!r} column: token weights need the text they weigh."
            )
    return present


def normalize_token_weights(
    weights: Any,
    completion_ids: Sequence[int],
    *,
    column: str,
    row: int,
    eos_token_id: int | None,
    eos_token_weight: float = 1.0,
) -> list[float]:
    """Check one row's weights against its completion tokens and return exactly one float per token.

    Accepts ``n`` weights, or ``n - 1`` when the last completion token is EOS (EOS then gets ``eos_token_weight``).
    Raises ``ValueError`` naming ``column`` and ``row`` for a wrong length or a negative/NaN/infinite weight.
    """
    if weights is None:
        raise ValueError(f"Column {column!r}, row {row}: weights are missing (None); give one float per token.")
    if isinstance(weights, str | bytes):  # "1101" would otherwise read as four weights
        raise ValueError(f"Column {column!r}, row {row}: expected a list of numbers, got the string {weights!r}.")
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"Column {column!r}, row {row}: expected a list of numbers, got {weights!r}.") from None
    for position, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"Column {column!r}, row {row}: weight {value!r} at token {position} is invalid; weights must be "
                "finite and non-negative."
            )
    n = len(completion_ids)
    if len(values) == n:
        return values
    ends_with_eos = n > 0 and eos_token_id is not None and completion_ids[-1] == eos_token_id
    if ends_with_eos and len(values) == n - 1:
        return values + [float(eos_token_weight)]
    expected = f"{n}" + (f" (or {n - 1}, without the final EOS)" if ends_with_eos else "")
    raise ValueError(
        f"Column {column!r}, row {row}: {len(values)} weights for {n} completion tokens; expected {expected}. "
        "Weights are per token of the trainer's tokenization (see hf_align.token_weights.weights_from_char_spans)."
    )


def normalize_weight_columns(
    dataset,
    columns: dict[str, str],
    eos_token_id: int | None,
    eos_token_weight: float = 1.0,
):
    """Validate and normalize weight columns of a tokenized ``datasets.Dataset`` (``{weight_column: ids_column}``).

    Runs before training, so a bad row fails the trainer's construction, not step 1234.
    """
    if not columns:
        return dataset

    def _normalize(example, index):
        return {
            weight_col: normalize_token_weights(
                example[weight_col],
                example[ids_col],
                column=weight_col,
                row=index,
                eos_token_id=eos_token_id,
                eos_token_weight=eos_token_weight,
            )
            for weight_col, ids_col in columns.items()
        }

    kwargs = {"desc": "Checking token weights"} if hasattr(dataset, "num_rows") else {}
    dataset = dataset.map(_normalize, with_indices=True, **kwargs)
    if hasattr(dataset, "num_rows"):
        for weight_col in columns:
            if not any(any(w != 0 for w in weights) for weights in dataset[weight_col]):
                warnings.warn(
                    f"Column {weight_col!r} is 0 for every token of every row: that side contributes nothing.",
                    stacklevel=2,
                )
    return dataset


# --------------------------------------------------------------------------------------------------------------
# Building weights from character spans


def _completion_token_char_ranges(tokenizer, prompt, completion, add_eos: bool) -> tuple[list[int], list[tuple]]:
    """Completion token ids as the DPO/SFT trainers tokenize them, and each token's char range in the completion text.

    Ranges outside the completion text (the appended EOS, chat-template tokens) are returned as ``None``.
    """
    from trl.data_utils import is_conversational  # noqa: PLC0415 - keep import of this module light

    example = {"prompt": prompt, "completion": completion}
    if is_conversational(example):
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        content = completion[-1]["content"]
        start = full_text.find(content, len(tokenizer.apply_chat_template(prompt, tokenize=False)))
        if start < 0:
            raise ValueError(f"Could not find the completion text {content!r} in the chat-template rendering.")
        encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        reference_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        prompt_ids = tokenizer.apply_chat_template(
            prompt, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        if list(encoded["input_ids"]) != list(reference_ids):
            raise ValueError(
                "The tokenizer's offsets do not match its chat-template tokenization; build weights by hand."
            )
        content_start, content_end = start, start + len(content)
    else:
        text = completion + (tokenizer.eos_token if add_eos and not completion.endswith(tokenizer.eos_token) else "")
        full_text = prompt + text
        encoded = tokenizer(full_text, return_offsets_mapping=True)
        prompt_ids = tokenizer(prompt)["input_ids"]
        content_start, content_end = len(prompt), len(prompt) + len(completion)
    ids = list(encoded["input_ids"])
    prompt_len = 0
    while prompt_len < min(len(ids), len(prompt_ids)) and ids[prompt_len] == prompt_ids[prompt_len]:
        prompt_len += 1
    ranges = []
    for start, end in encoded["offset_mapping"][prompt_len:]:
        lo, hi = max(start, content_start), min(end, content_end)
        ranges.append((lo - content_start, hi - content_start) if hi > lo else None)
    return ids[prompt_len:], ranges


def weights_from_char_spans(
    tokenizer,
    prompt: str | list,
    completion: str | list,
    spans: Sequence[tuple[int, int]],
    inside: float = 1.0,
    outside: float = 0.0,
    special: float = 1.0,
    add_eos: bool = True,
) -> list[float]:
    """One weight per completion token (trainer's tokenization): ``inside`` if it overlaps a character span.

    ``spans`` are half-open ``(start, end)`` character ranges of the completion text (the assistant ``content`` for
    conversational data). Tokens outside the completion text (the EOS TRL appends to standard data, chat-template
    tokens) get ``special``. ``add_eos`` mirrors TRL's EOS appending for standard data (True for DPO and SFT).
    """
    _, ranges = _completion_token_char_ranges(tokenizer, prompt, completion, add_eos)
    weights = []
    for token_range in ranges:
        if token_range is None:
            weights.append(float(special))
            continue
        lo, hi = token_range
        hit = any(min(hi, end) > max(lo, start) for start, end in spans)
        weights.append(float(inside if hit else outside))
    return weights


def char_span_weights(
    tokenizer,
    spans_column: str,
    target: str = "rejected",
    inside: float = 1.0,
    outside: float = 0.0,
    special: float = 1.0,
    positions: bool = False,
) -> Callable[[dict], dict]:
    """A ``datasets.map`` function writing ``{target}_weights`` from a column of character spans.

    With ``positions=True`` the column holds character *positions* (e.g. the testbed's
    ``rejected_wrong_positions``), each a one-character span.

    >>> ds = ds.map(char_span_weights(tokenizer, "rejected_wrong_positions", positions=True))  # doctest: +SKIP
    """

    def _fn(example: dict) -> dict:
        raw = example[spans_column] or []
        spans = [(p, p + 1) for p in raw] if positions else [tuple(s) for s in raw]
        weights = weights_from_char_spans(
            tokenizer, example["prompt"], example[target], spans, inside=inside, outside=outside, special=special
        )
        return {f"{target}_weights": weights}

    return _fn


# --------------------------------------------------------------------------------------------------------------
# Tensors: collation and weighted sums


def sequence_weights(
    prompt_len: int, weights: Sequence[float] | None, num_completion: int, sl: slice | None = None
) -> list[float]:
    """Weights over a whole prompt+completion sequence (0 on the prompt), truncated like the collator's ids."""
    row = [0.0] * prompt_len + (list(weights) if weights is not None else [1.0] * num_completion)
    return row[sl] if sl is not None else row


def weighted_sum(per_token_logps: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``Σ_t w_t · log π_t`` per row (``weights`` None ⇒ plain sum)."""
    if weights is None:
        return per_token_logps.sum(dim=-1)
    return (per_token_logps * weights.to(per_token_logps.dtype)).sum(dim=-1)


def select_lowest_ratio_tokens(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, completion_mask: torch.Tensor, ratio: float
) -> torch.Tensor:
    """ALLO's dynamic token selection: per row, the fraction ``ratio`` of completion tokens with lowest log-ratio.

    ``k = max(1, floor(ratio · n))`` with ``n`` the row's completion tokens (ALLO's ``gen_mask`` floors
    ``ratio · padded_length``, which lets padding change the selection; we use the row's own length). Ties with the
    k-th lowest value are included, as in ALLO, so at initialization (all ratios 0) every token counts. Returns a 0/1
    mask of the inputs' shape (0 outside the completion); no gradient flows through the selection.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"rejected_token_ratio must be in (0, 1], got {ratio}.")
    with torch.no_grad():
        completion = completion_mask.bool()
        logratio = (policy_logps - ref_logps).float().masked_fill(~completion, float("inf"))
        counts = completion.sum(dim=-1)
        k = torch.clamp(torch.floor(counts.double() * ratio).long(), min=1)
        k = torch.minimum(k, counts.clamp(min=1))
        sorted_vals, _ = logratio.sort(dim=-1)
        threshold = sorted_vals.gather(-1, (k - 1).unsqueeze(-1))
        selected = (logratio <= threshold) & completion
    return selected.to(policy_logps.dtype)


def ld_alpha_multiplier(shift_completion_mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor | None:
    """Per-token multiplier equivalent to TRL's LD-DPO (1 on the shared length of a pair, ``ld_alpha`` beyond)."""
    if ld_alpha is None:
        return None
    comp_pos = shift_completion_mask.cumsum(dim=1)
    comp_lens = shift_completion_mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens)
    shared = torch.cat([shared, shared], dim=0).unsqueeze(1)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared)
    tail_mask = comp_pos > shared
    return (shared_mask.float() + ld_alpha * tail_mask.float()) * shift_completion_mask
