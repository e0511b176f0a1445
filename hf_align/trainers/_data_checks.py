"""Early, named errors for training data, before TRL's tokenization fails deep inside ``datasets.map`` -- or,
worse, trains on it: a message without a role is rendered as if it had one, an empty cell crashes at step 1,
identical ``chosen`` and ``rejected`` give DPO nothing to learn."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from hf_align.errors import UserError


TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages", "text")
ROLES = ("system", "user", "assistant", "tool", "developer")
_SCAN_BATCH = 1024


def column_names(dataset) -> list[str]:
    """A dataset's columns; an IterableDataset without features shows them in its first row."""
    return list(getattr(dataset, "column_names", None) or next(iter(dataset)).keys())


def _text_problem(value: Any) -> str | None:
    """What is wrong with one cell of a text column (a string, or a list of chat messages), or None."""
    if isinstance(value, str):
        return None
    if value is None:
        return "is empty (None); every row needs a string or a list of messages: fill or drop the row"
    if not isinstance(value, list):
        return f"holds {value!r} ({type(value).__name__}); expected a string or a list of messages"
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {index} is {message!r}, not a {{'role': ..., 'content': ...}} mapping"
        role = message.get("role")
        if role is None:
            return f"message {index} has no 'role'; expected one of {list(ROLES)}"
        if role not in ROLES:
            return f"message {index} has role {role!r}; expected one of {list(ROLES)}"
        if "content" not in message and "tool_calls" not in message:
            return f"message {index} ({role}) has no 'content'"
    return None


def _rows(dataset, columns: list[str]):
    """``(row index, {column: value})`` over a map-style dataset, read in batches of the needed columns only."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "select_columns"):
        return  # an IterableDataset: its rows are checked as TRL reads them
    start = 0
    for batch in dataset.select_columns(columns).iter(batch_size=_SCAN_BATCH):
        size = len(batch[columns[0]])
        for offset in range(size):
            yield start + offset, {column: batch[column][offset] for column in columns}
        start += size


def check_rows(dataset, name: str) -> None:
    """Every text cell is a string or a list of well-formed messages (error names column, row and the fix); warn
    when every ``chosen`` equals its ``rejected`` (DPO has nothing to prefer)."""
    columns = [c for c in TEXT_COLUMNS if c in column_names(dataset)]
    if not columns:
        return
    pairs = "chosen" in columns and "rejected" in columns
    same = rows = 0
    for row, cells in _rows(dataset, columns):
        for column, value in cells.items():
            problem = _text_problem(value)
            if problem:
                raise ValueError(f"{name} column {column!r}, row {row}: {problem}.")
        rows += 1
        same += pairs and cells["chosen"] == cells["rejected"]
    if pairs and rows and same == rows:
        warnings.warn(
            f"{name}: 'chosen' equals 'rejected' in every one of its {rows} rows: there is no preference to learn.",
            stacklevel=3,
        )


def check_dataset(dataset, name: str, accepted: Sequence[Sequence[str]] | None = None) -> None:
    """``dataset`` must be non-empty, hold one of the ``accepted`` column sets (a dict of datasets: each) and pass
    :func:`check_rows`."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_dataset(value, f"{name}[{key!r}]", accepted)
        return
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name} is empty: it needs at least one example.")
    names = column_names(dataset)
    matches = [columns for columns in accepted or () if all(column in names for column in columns)]
    if accepted is not None and not matches:
        options = " or ".join("+".join(columns) for columns in accepted)
        raise UserError(f"{name} is missing columns: expected {options}; found columns {names}.")
    if len(matches) > 1:  # e.g. prompt+completion and messages: which one is the data would be a silent guess
        both = " and ".join("+".join(columns) for columns in matches)
        raise UserError(f"{name} holds both {both}: keep the columns of one format and drop the others.")
    check_rows(dataset, name)


def check_not_truncated_away(before: int, after: int, name: str, args) -> None:
    """TRL drops examples whose completion ``max_length`` cuts off entirely: all of them is an error (nothing would
    train; torch would say ``num_samples=0`` at ``train()``), some of them a warning with the count."""
    if after == before:
        return
    how = f"max_length={args.max_length} with truncation_mode={getattr(args, 'truncation_mode', None)!r}"
    if after == 0:
        raise ValueError(
            f"{name}: {how} leaves no completion token in any of its {before} examples (the prompts fill it); "
            "raise max_length or truncate from the start (truncation_mode='keep_end')."
        )
    warnings.warn(f"{name}: {before - after} of {before} examples lost their whole completion to {how}.", stacklevel=3)


def drop_truncated_away(dataset, has_completion, name: str, args, **map_kwargs):
    """``dataset.filter(has_completion)`` after truncation, checked by :func:`check_not_truncated_away`."""
    before = len(dataset) if hasattr(dataset, "num_rows") else None
    dataset = dataset.filter(has_completion, **map_kwargs)
    if before is not None:
        check_not_truncated_away(before, len(dataset), name, args)
    return dataset
