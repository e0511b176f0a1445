"""Which Trainer checkpoint a resume may trust: the last *complete* ``checkpoint-N``, never a half-written one.

``transformers.Trainer._save_checkpoint`` writes a checkpoint folder in this order: the model (``save_model``),
then the optimizer, scheduler, scaler and RNG state, then ``trainer_state.json`` last. A kill in between leaves a
``checkpoint-N`` folder that is empty or holds only the model/config; ``transformers.trainer_utils.get_last_checkpoint``
still picks it by its number and the resume fails (or, without ``optimizer.pt``, silently restarts the optimizer).
Every place in hf-align that resolves ``resume_from_checkpoint`` goes through :func:`resolve_resume_checkpoint`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from hf_align.errors import UserError
from hf_align.io import PathLike


TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME, written last
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0", "")


def is_complete_checkpoint(path: PathLike) -> bool:
    """Complete once ``trainer_state.json`` (the Trainer's last write, not atomic itself) is there and parses."""
    state = Path(path) / TRAINER_STATE
    try:
        return isinstance(json.loads(state.read_text()), dict)
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(output_dir: PathLike) -> Path | None:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir`` (``None`` if there is none).

    Incomplete ones with a higher number are skipped with a warning that names them.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, path in sorted(numbered, reverse=True):
        if is_complete_checkpoint(path):
            return path
        warnings.warn(
            f"Skipping incomplete checkpoint {str(path)!r} (no {TRAINER_STATE}: its save was interrupted).",
            stacklevel=2,
        )
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: PathLike) -> str | None:
    """``resume_from_checkpoint`` as given (``None``/``False``, ``True``/``"true"``, or a path) → a path or ``None``.

    ``True`` means the last complete checkpoint in ``output_dir``; an explicit path must be a complete checkpoint.
    Errors name the field and the folder, before any model is loaded for nothing.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    text = str(resume_from_checkpoint).strip()
    if text.lower() in _FALSE:
        return None
    if resume_from_checkpoint is True or text.lower() in _TRUE:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=true: no complete checkpoint-N (with {TRAINER_STATE}) in {str(output_dir)!r}."
            )
        return str(found)
    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {text!r}: no such checkpoint folder.")
    if not is_complete_checkpoint(path):
        raise UserError(
            f"resume_from_checkpoint {text!r} is incomplete (no {TRAINER_STATE}: its save was interrupted); "
            "pass an earlier checkpoint or resume_from_checkpoint=true to take the last complete one."
        )
    return str(path)
