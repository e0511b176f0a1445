"""Which Trainer checkpoint a resume may trust: the last *complete* ``checkpoint-N``, never a half-written one.

``transformers.Trainer._save_checkpoint`` writes a checkpoint folder in this order: the model (``save_model``),
then the optimizer, scheduler, scaler and RNG state, then ``trainer_state.json`` last. A kill in between leaves a
``checkpoint-N`` folder that is empty or holds only the model/config; ``transformers.trainer_utils.get_last_checkpoint``
still picks it by its number and the resume fails (or, without ``optimizer.pt``, silently restarts the optimizer).
Every place in hf-align that resolves ``resume_from_checkpoint`` goes through :func:`resolve_resume_checkpoint`: the
CLI, the pipeline (:func:`last_complete_checkpoint`) and every hf-align trainer's own ``train()``
(``HFAlignTrainerMixin.train``, since transformers picks ``get_last_checkpoint`` inside ``Trainer.train``).
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


def checkpoint_problem(path: PathLike) -> str | None:
    """Why ``path`` is not a complete checkpoint, or ``None`` when it is: the one definition every resume uses.

    Complete: ``trainer_state.json`` (the Trainer's last write, not atomic itself) is present, parses as a JSON
    object whose ``global_step`` is an integer, and, for a folder named ``checkpoint-N``, equals N. Weight files are
    not required by name: a sharded engine (DeepSpeed) saves its own layout, and they are written before the state.
    """
    state_path = Path(path) / TRAINER_STATE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE}: its save was interrupted"
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is not readable JSON ({type(err).__name__})"
    if not isinstance(state, dict):
        return f"{TRAINER_STATE} is not a JSON object"
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool):
        return f"{TRAINER_STATE} has global_step {step!r:.40}, not an integer"
    match = _CHECKPOINT.match(Path(path).name)
    if match and int(match.group(1)) != step:
        return f"{TRAINER_STATE} says global_step {step}, not {match.group(1)} as the folder's name"
    return None


def is_complete_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint (:func:`checkpoint_problem`)."""
    return checkpoint_problem(path) is None


def last_complete_checkpoint(output_dir: PathLike) -> Path | None:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir`` (``None`` if there is none).

    Incomplete ones with a higher number are skipped with a warning that names them.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, path in sorted(numbered, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"Skipping incomplete checkpoint {str(path)!r} ({problem}).", stacklevel=2)
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
                f"resume_from_checkpoint=true: no complete checkpoint-N (with a valid {TRAINER_STATE}) in "
                f"{str(output_dir)!r}."
            )
        return str(found)
    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {text!r}: no such checkpoint folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(
            f"resume_from_checkpoint {text!r} is incomplete ({problem}); "
            "pass an earlier checkpoint or resume_from_checkpoint=true to take the last complete one."
        )
    return str(path)
