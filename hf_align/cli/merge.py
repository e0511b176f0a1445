"""``hf-align merge``: θ = α·θ_base + (1−α)·θ_aligned, linear or partwise (AMA), streamed tensor by tensor.

    hf-align merge --base_model_name_or_path A --model_name_or_path B --alpha 0.2 --output_dir DIR
    hf-align merge --base_model_name_or_path A --model_name_or_path B --pivots 10,20 --alphas 0.4,0.3,0.2 --output_dir DIR
    hf-align merge --config recipes/ama/partwise.yaml --base_model_name_or_path A --model_name_or_path B --output_dir DIR

``--model_name_or_path`` is the aligned model and ``--base_model_name_or_path`` the pre-alignment one, as in
``hf-align adaptive-merge``; either can be a local folder, a Hub id or a PEFT adapter folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_align.config_checks import UNIT, CheckedConfig, option
from hf_align.errors import UserError
from hf_align.merging.plan import TIED_BLOCKS


@dataclass
class MergeArguments(CheckedConfig):
    """The two models, the α's, and where the merged model goes."""

    base_model_name_or_path: str = option(help="Pre-alignment model: folder, Hub id or adapter folder.")
    model_name_or_path: str = option(help="Aligned model: folder, Hub id or PEFT adapter folder.")
    output_dir: str = option(help="Folder for the merged model (must not exist unless --overwrite).")
    alpha: float | None = option(None, help="Linear merge: one α in [0, 1] for every tensor.", range=UNIT)
    pivots: str | None = option(
        None, help="Partwise: inclusive layer pivots, '10,20' or '10#20' → 0–10, 11–20, 21–end."
    )
    alphas: str | None = option(None, help="Partwise: one α per part, '0.4,0.3,0.2' or '0.4|0.3|0.2'.")
    embed_alpha: float | None = option(
        None, help="Partwise: α of the input embeddings (default: first part).", range=UNIT
    )
    head_alpha: float | None = option(
        None, help="Partwise: α of lm_head and the final norm (default: last).", range=UNIT
    )
    other_alpha: float | None = option(
        None, help="Partwise: α of tensors no rule covers (default: error).", range=UNIT
    )
    tied_block: str | None = option(
        None,
        help="Partwise, tied embeddings (one tensor for embedding and lm_head): the block whose α it takes, merged "
        "once: 'embed' or 'head' (default: the one whose α you gave, else embed).",
        choices=TIED_BLOCKS,
    )
    plot: bool = option(False, help="Also write merge_alphas.png (α per block) next to merge_plan.json.")
    dtype: str = option("auto", help="Output dtype: auto (aligned's), bfloat16, float16, float32.")
    max_shard_size: str = option("500MB", help="Largest output shard, e.g. 500MB, 2GB.")
    revision: str | None = option(None, help="Hub revision for Hub ids.")
    overwrite: bool = option(False, help="Replace --output_dir if it exists (atomically).")
    no_progress: bool = option(False, help="No progress bar.")
    push_to_hub: str | None = option(None, help="Upload the merged model (with a card) to this repo id.")
    private: bool = option(False, help="With --push_to_hub: create the repo private.")


RENAMED = {"--base": "--base_model_name_or_path", "--aligned": "--model_name_or_path", "--output": "--output_dir"}


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command
    from hf_align.merging import merge_models, partwise_builder
    from hf_align.scripts.utils import refuse_existing_output, resolve_model_path

    (args,) = parse_command("hf-align merge", (MergeArguments,), argv, renamed=RENAMED, description=__doc__)
    partwise = args.pivots is not None or args.alphas is not None
    if (args.alpha is None) == (not partwise):
        raise UserError("give either --alpha (linear) or --alphas [--pivots] (partwise), not both or neither.")
    if args.tied_block is not None and not partwise:
        raise UserError("--tied_block is for partwise merges (--alphas): a linear merge gives every tensor one α.")
    plan = None
    if partwise:  # the layer count and the tie come from the checkpoint's config (one rule, as the callback's)
        plan = partwise_builder(args.pivots or "", args.alphas or "", embed_alpha=args.embed_alpha,
                                head_alpha=args.head_alpha, other_alpha=args.other_alpha,
                                tied_block=args.tied_block)  # fmt: skip

    refuse_existing_output(args.output_dir, "--output_dir", args.overwrite)
    result = merge_models(
        resolve_model_path(args.base_model_name_or_path),
        resolve_model_path(args.model_name_or_path),
        args.output_dir,
        alpha=args.alpha,
        plan=plan,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        revision=args.revision,
        plot=args.plot,
    )
    print(result.plan.table())
    print(f"merged {result.num_tensors} tensors into {result.num_shards} shard(s) at {result.output_dir}")
    if args.push_to_hub:
        push_merged(args, result)
    return 0


def push_merged(args: MergeArguments, result, api=None):
    """Upload the merged folder with a card that records both inputs and the α per tensor group."""
    from hf_align.hub import merge_model_card, push_folder

    card = merge_model_card(args.base_model_name_or_path, args.model_name_or_path, result.plan, repo=args.push_to_hub)
    return push_folder(result.output_dir, args.push_to_hub, card, private=args.private or None, api=api)
