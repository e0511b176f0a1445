"""Keep pickles out of what hf-align writes: ``training_args.json`` instead of transformers' ``training_args.bin``.

``transformers.Trainer`` saves its arguments with ``torch.save`` (a pickle) into every checkpoint and output folder.
Nothing reads that file back when resuming, so this callback replaces it with the same arguments as JSON after each
checkpoint; :func:`replace_training_args_pickle` does the same for a final ``save_model`` folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

from hf_align.io import PathLike, apply_file_mode, atomic_file


TRAINING_ARGS_PICKLE = "training_args.bin"
TRAINING_ARGS_JSON = "training_args.json"


def replace_training_args_pickle(directory: PathLike, args) -> bool:
    """Write ``args`` as ``training_args.json`` into ``directory``; delete ``training_args.bin`` (True if it was).

    The one hook every save of a trained folder passes through (trainers, checkpoints, the CLI's final save), so it
    also gives the weights the umask's mode (:func:`hf_align.io.apply_file_mode`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return False
    apply_file_mode(directory)
    with atomic_file(directory / TRAINING_ARGS_JSON, "w") as handle:
        handle.write(public_args_json(args))
    pickle_path = directory / TRAINING_ARGS_PICKLE
    if not pickle_path.exists():
        return False
    pickle_path.unlink()
    return True


def public_args_json(args) -> str:
    """``args`` as JSON with every local path replaced by its Hub id or last component (``output_dir`` is
    ``out``, not ``/home/me/runs/out``): the file is uploaded with the model, and nothing reads it back to resume."""
    from hf_align.hub import public_value

    return json.dumps(public_value(json.loads(args.to_json_string())), indent=2, sort_keys=True) + "\n"


class JsonTrainingArgsCallback(TrainerCallback):
    """After each checkpoint save, swap the pickled training arguments for JSON (main process only)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            replace_training_args_pickle(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), args)
