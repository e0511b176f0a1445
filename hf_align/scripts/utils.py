"""What the commands' scripts share: model and dataset names, data splits and columns, outputs they refuse to replace.

Model names: a Hub id, a local directory, or ``testbed`` (the shipped tiny model).
Dataset names: a Hub id, a ``save_to_disk`` directory, a data file (``.json``/``.jsonl``/``.parquet``/``.csv``),
or ``testbed:<kind>`` with kind one of ``preference``, ``sft``, ``prompts``, ``forget``, ``retain``
(append ``-conversational`` for the chat format, e.g. ``testbed:preference-conversational``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from hf_align.errors import UserError


if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


TESTBED_KINDS = ("preference", "sft", "prompts", "forget", "retain")


def refuse_existing_output(path: str | Path, flag: str, overwrite: bool, names: Iterable[str] | None = None) -> None:
    """Refuse to replace an existing output unless ``--overwrite`` was given; the error names both flags.

    ``names``: the files a command writes into the folder ``path`` (it touches nothing else there), so only those
    count; without ``names`` any existing file, or a folder with anything in it, counts.
    """
    path = Path(path)
    if overwrite or not path.exists():
        return
    if names is not None:
        clashes = sorted(name for name in names if (path / name).exists())
        if clashes:
            raise FileExistsError(f"{flag} {str(path)!r} already holds {clashes}; pass --overwrite to replace them.")
    elif not path.is_dir() or any(path.iterdir()):
        raise FileExistsError(f"{flag} {str(path)!r} already exists and is not empty; pass --overwrite to replace it.")


def resolve_model_path(name: str) -> str:
    """``testbed`` → the shipped model's folder; anything else is passed through (Hub id or path)."""
    if name == "testbed":
        from hf_align.testbed import MODEL_DIR

        return str(MODEL_DIR)
    return name


def load_dataset_any(name: str, config: str | None = None, streaming: bool = False) -> DatasetDict:
    """Load a dataset by any of the names in the module docstring; always returns a ``DatasetDict``."""
    import datasets
    from datasets import DatasetDict

    if name.startswith("testbed:"):
        return DatasetDict({"train": _testbed_dataset(name.split(":", 1)[1])})
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if builder is None:
            raise UserError(
                f"dataset_name {name!r}: unsupported file type {path.suffix!r}; use .json, .jsonl, "
                ".parquet or .csv, a save_to_disk directory, or a Hub dataset id."
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
    return datasets.load_dataset(name, name=config, streaming=streaming)


def _testbed_dataset(kind: str) -> Dataset:
    from hf_align import testbed

    conversational = kind.endswith("-conversational")
    kind = kind.removesuffix("-conversational")
    makers = {
        "preference": testbed.preference_dataset,
        "sft": testbed.sft_dataset,
        "prompts": testbed.prompt_dataset,
        "forget": testbed.forget_dataset,
        "retain": testbed.retain_dataset,
    }
    if kind not in makers:
        raise UserError(f"dataset_name 'testbed:{kind}': unknown testbed dataset; choose one of {TESTBED_KINDS}.")
    return makers[kind](conversational=conversational)


def split(dataset: DatasetDict, name: str, source: str) -> Dataset:
    if name not in dataset:
        raise UserError(f"{source}: split {name!r} not found; available splits: {sorted(dataset)}.")
    return dataset[name]


def load_split(name: str, split_name: str, source: str, config: str | None = None, limit: int | None = None):
    """One split of a dataset named as in the module docstring, its first ``limit`` rows; an empty one is refused."""
    dataset = split(load_dataset_any(name, config), split_name, f"{source} {name!r}")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise UserError(f"{source} {name!r}: no rows in split {split_name!r}.")
    return dataset


def require_columns(dataset: Dataset, columns: Iterable[str], source: str, hint: str = "") -> None:
    """Fail before any model is loaded when a column is missing, naming it (the trainers check their own data)."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserError(f"{source}: missing column(s) {missing}; found {dataset.column_names}.{hint}")
