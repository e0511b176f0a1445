"""Notices from optional backends a run does not use, silenced at their source (``import hf_align`` installs this).

A command prints its progress, its result and warnings about the user's run. These lines are none of those and stood
before every command's one line: bitsandbytes' kernels-hub fallback on a CPU with AVX512-BF16 (and the ``kernels``
package's offline trust notice for that same kernel), DeepSpeed's "Setting accelerator to CPU" on a machine without
a GPU, and transformers' deprecation of the ``gradient_checkpointing`` spelling that TRL's own configs set by default.
Each is dropped by a filter on its own logger (only that message, not the logger's other warnings) or a warnings
filter scoped to its message and module; nothing swallows stderr. ``hf-align --verbose`` (or ``HF_ALIGN_VERBOSE=1``)
shows them: :func:`show_backend_notices` removes the filters and replays what was dropped.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field


VERBOSE_ENV = "HF_ALIGN_VERBOSE"
BACKEND_NOTICES: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    "DeepSpeed": ("Setting accelerator to CPU.",),
}
"""logger name → starts of the messages from it that are not about the user's run."""
BACKEND_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`gradient_checkpointing(_kwargs)?` is deprecated", r"transformers\.training_args"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)
"""(category, message regex, module regex) of library-to-library deprecation warnings."""


@dataclass
class VerboseArguments:
    """The ``--verbose`` switch every ``hf-align`` command takes."""

    verbose: bool = field(
        default=False,
        metadata={"help": "Show notices from optional backends the run does not use (bitsandbytes, DeepSpeed, ...)."},
    )


class _DropNotices(logging.Filter):
    """Drops (and keeps, for :func:`show_backend_notices`) the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts, self.dropped = starts, []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.starts):
            self.dropped.append(record)
            return False
        return True


_filters: dict[str, _DropNotices] = {}


def quiet_backend_notices() -> None:
    """Install the filters (once; nothing when ``HF_ALIGN_VERBOSE=1``)."""
    if os.environ.get(VERBOSE_ENV) == "1" or _filters:
        return
    for name, starts in BACKEND_NOTICES.items():
        _filters[name] = _DropNotices(starts)
        logging.getLogger(name).addFilter(_filters[name])
    ignore_backend_warnings()


def ignore_backend_warnings() -> None:
    """The warnings filters of :data:`BACKEND_WARNINGS` (each scoped to its message and module)."""
    for category, message, module in BACKEND_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def show_backend_notices() -> None:
    """``--verbose``: remove the filters, replay what they dropped, and let the processes this one starts show all."""
    os.environ[VERBOSE_ENV] = "1"
    for name, drop in _filters.items():
        logger = logging.getLogger(name)
        logger.removeFilter(drop)
        for record in drop.dropped:
            logger.handle(record)
    _filters.clear()
    warnings.filters[:] = [
        f for f in warnings.filters if not (f[0] == "ignore" and f[1] is not None and _ours(f[1].pattern, f[2]))
    ]


def _ours(pattern: str, category: type[Warning]) -> bool:
    return any(pattern == message and category is cat for cat, message, _ in BACKEND_WARNINGS)
