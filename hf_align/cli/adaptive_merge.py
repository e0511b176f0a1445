"""``hf-align adaptive-merge``: learn AMA's per-block averaging ratios on data, then stream-merge with them.

    hf-align adaptive-merge --config recipes/ama/adaptive.yaml \
        --model_name_or_path <aligned model> --base_model_name_or_path <pre-alignment model> \
        --dataset_name <data> --output_dir out/ama

``--model_name_or_path`` is the aligned model θ1 and ``--base_model_name_or_path`` the base θ0 (``testbed`` names
the shipped tiny model). The data: a ``text`` column, ``prompt``/``completion`` or ``messages`` (AMA uses samples
of the aligned model filtered by reward, RAFT-style). Writes the learned α's (``ama_alphas.safetensors`` +
``.json``) to ``--output_dir`` and the merged model to ``--merged_output_dir`` (default ``<output_dir>/merged``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hf_align.config_checks import CheckedConfig, option
from hf_align.errors import UserError


@dataclass
class MergeOutputArguments(CheckedConfig):
    """Where and how the final merge is written."""

    merged_output_dir: str | None = option(None, help="Folder for the merged model (default: <output_dir>/merged).")
    merge_dtype: str = option("auto", help="Output dtype: auto, bfloat16, float16, float32.")
    max_shard_size: str = option("500MB", help="Largest output shard, e.g. 500MB, 2GB.")
    skip_merge: bool = option(False, help="Only learn and save the α's.")
    overwrite: bool = option(False, help="Replace an existing non-empty --merged_output_dir (refused otherwise).")


def main(argv: list[str] | None = None) -> int:
    from trl import ModelConfig, ScriptArguments

    from hf_align.cli.common import parse_command
    from hf_align.scripts.utils import load_split, refuse_existing_output, resolve_model_path
    from hf_align.trainers.registry import TRAINERS

    spec = TRAINERS["adaptive-merge"]
    types = (ScriptArguments, spec.config_class(), ModelConfig, MergeOutputArguments)
    script_args, config, model_args, merge_args = parse_command(
        "hf-align adaptive-merge", types, argv, description=__doc__
    )
    for name, value, what in (
        ("model_name_or_path", model_args.model_name_or_path, "the aligned model θ1"),
        ("base_model_name_or_path", config.base_model_name_or_path, "the pre-alignment model θ0"),
        ("dataset_name", script_args.dataset_name, "the data the α's are learned on"),
    ):
        if not value:
            raise UserError(f"--{name} ({what}) is required.")
    merged_dir = Path(merge_args.merged_output_dir or Path(config.output_dir) / "merged")
    if not merge_args.skip_merge:
        refuse_existing_output(merged_dir, "--merged_output_dir", merge_args.overwrite)
    from hf_align.checkpoints import resolve_resume_checkpoint

    resume = resolve_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    train = load_split(
        script_args.dataset_name, script_args.dataset_train_split, "dataset_name", script_args.dataset_config
    )
    trainer = spec.trainer_class()(
        resolve_model_path(model_args.model_name_or_path),
        base_model=resolve_model_path(config.base_model_name_or_path),
        args=config,
        train_dataset=train,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    print(trainer.learned_alphas().summary(config.merge_head_alpha))  # an α that never moved is marked, not "learned"
    if merge_args.skip_merge or not config.should_save:
        return 0
    result = trainer.merge(
        merged_dir,
        dtype=merge_args.merge_dtype,
        max_shard_size=merge_args.max_shard_size,
        progress=not config.disable_tqdm,
    )
    print(result.plan.table())
    print(f"merged model written to {result.output_dir}")
    return 0
