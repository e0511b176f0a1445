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

import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MergeOutputArguments:
    """Where and how the final merge is written."""

    merged_output_dir: str | None = field(
        default=None, metadata={"help": "Folder for the merged model (default: <output_dir>/merged)."}
    )
    merge_dtype: str = field(default="auto", metadata={"help": "Output dtype: auto, bfloat16, float16, float32."})
    max_shard_size: str = field(default="500MB", metadata={"help": "Largest output shard, e.g. 500MB, 2GB."})
    skip_merge: bool = field(default=False, metadata={"help": "Only learn and save the α's."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing non-empty --merged_output_dir (refused otherwise)."}
    )


def make_parser(prog: str = "hf-align adaptive-merge"):
    from hf_align.cli.common import make_trl_parser
    from hf_align.trainers.adaptive_merge import AdaptiveMergeConfig

    return make_trl_parser(AdaptiveMergeConfig, prog=prog, extra=(MergeOutputArguments,))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    script_args, config, model_args, merge_args = parser.parse_args_and_config(argv)
    from hf_align.checkpoints import resolve_resume_checkpoint
    from hf_align.cli.common import load_dataset_any, refuse_existing_output, resolve_model_path, split
    from hf_align.trainers.adaptive_merge import AdaptiveMergeTrainer

    if not model_args.model_name_or_path:
        parser.error("--model_name_or_path (the aligned model θ1) is required.")
    if not config.base_model_name_or_path:
        parser.error("--base_model_name_or_path (the pre-alignment model θ0) is required.")
    if not script_args.dataset_name:
        parser.error("--dataset_name is required.")
    aligned = resolve_model_path(model_args.model_name_or_path)
    base = resolve_model_path(config.base_model_name_or_path)
    merged_dir = Path(merge_args.merged_output_dir or Path(config.output_dir) / "merged")
    if not merge_args.skip_merge:
        refuse_existing_output(merged_dir, "--merged_output_dir", merge_args.overwrite)
    resume = resolve_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
    train = split(dataset, script_args.dataset_train_split, f"dataset_name {script_args.dataset_name!r}")
    trainer = AdaptiveMergeTrainer(aligned, base_model=base, args=config, train_dataset=train)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    learned = trainer.learned_alphas()
    print(f"learned α per block: {[round(a, 4) for a in learned.block_alphas]}, lm_head: {learned.head_alpha:.4f}")
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


if __name__ == "__main__":
    sys.exit(main())
