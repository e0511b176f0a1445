"""Early, named errors for training data, before TRL's tokenization fails deep inside ``datasets.map``."""

from __future__ import annotations

from collections.abc import Sequence


def column_names(dataset) -> list[str]:
    """A dataset's columns; an IterableDataset without features shows them in its first row."""
    return list(getattr(dataset, "column_names", None) or next(iter(dataset)).keys())


def check_dataset(dataset, name: str, accepted: Sequence[Sequence[str]] | None = None) -> None:
    """``dataset`` must be non-empty and hold one of the ``accepted`` column sets (a dict of datasets: each)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_dataset(value, f"{name}[{key!r}]", accepted)
        return
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name} is empty: it needs at least one example.")
    if accepted is None:
        return
    names = column_names(dataset)
    if not any(all(column in names for column in columns) for columns in accepted):
        options = " or ".join("+".join(columns) for columns in accepted)
        raise ValueError(f"{name} is missing columns: expected {options}; found columns {names}.")
