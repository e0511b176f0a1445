"""One progress-bar helper for every long step hf-align runs outside the Trainer's own loop (sampling, scoring,
selection, token labeling, merging, evaluation): ``tqdm.auto`` with a description, a unit and a total.

The switches are the usual ones: ``TQDM_DISABLE=1`` in the environment, transformers'
``disable_progress_bar()`` (which ``--disable_tqdm`` calls through :func:`disable_progress_bars`), or a caller's
``enabled=False`` (a trainer passes ``not args.disable_tqdm``). :func:`close_progress_bars` ends every open bar's
line, so that a one-line error never lands after a half-drawn bar.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProgressArguments:
    """``--disable_tqdm`` for the commands without ``TrainingArguments`` (which declares its own)."""

    disable_tqdm: bool = field(default=False, metadata={"help": "Whether to disable the progress bars."})


def apply_output_switches(parsed: Iterable[Any]) -> None:
    """After a command's parse: ``--verbose`` shows the backends' notices, ``--disable_tqdm`` turns every bar off."""
    from hf_align.quiet import show_backend_notices

    if any(getattr(obj, "verbose", False) is True for obj in parsed):
        show_backend_notices()
    if any(getattr(obj, "disable_tqdm", False) is True for obj in parsed):
        disable_progress_bars()


def progress_enabled() -> bool:
    """False under ``TQDM_DISABLE=1`` or after transformers' ``disable_progress_bar()``."""
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true")


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str,
    total: float | None = None,
    enabled: bool = True,
    **kwargs: Any,
):
    """A ``tqdm.auto`` bar (``total`` defaults to ``len(iterable)``), shown when ``enabled`` and
    :func:`progress_enabled`; use it as a context manager or iterate it."""
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    disable = not (enabled and progress_enabled())
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=disable, dynamic_ncols=True, **kwargs)


def disable_progress_bars() -> None:
    """Every bar off in this process (transformers', the Hub's, datasets', hf-align's) and in those it starts."""
    from transformers.utils import logging as hf_logging

    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency of TRL
        pass


def close_progress_bars() -> None:
    """Close every open tqdm bar (its line ends), before an error is printed."""
    from tqdm import std
    from tqdm.auto import tqdm as auto_tqdm

    bars = {bar for cls in (std.tqdm, auto_tqdm) for bar in list(getattr(cls, "_instances", ()))}
    for bar in bars:
        bar.close()
