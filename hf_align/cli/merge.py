"""``hf-align merge``: θ = α·θ_base + (1−α)·θ_aligned, linear or partwise (AMA), streamed tensor by tensor.

    hf-align merge --base A --aligned B --alpha 0.2 --output DIR
    hf-align merge --base A --aligned B --pivots 10,20 --alphas 0.4,0.3,0.2 [--embed-alpha x] [--head-alpha y] --output DIR
    hf-align merge --config recipes/ama/partwise.yaml --base A --aligned B --output DIR

A ``--config`` YAML sets defaults for the same options (keys with ``_`` or ``-``); flags override it.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from hf_align.cli.common import add_kebab_aliases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-align merge",
        description="Average base and aligned weights: θ = α·θ_base + (1−α)·θ_aligned (linear or partwise AMA).",
    )
    parser.add_argument("--config", help="YAML recipe whose keys set defaults for the options below.")
    parser.add_argument("--base", help="Pre-alignment model: local folder, Hub id or PEFT adapter folder.")
    parser.add_argument("--aligned", help="Aligned model: local folder, Hub id or PEFT adapter folder.")
    parser.add_argument("--output", help="Folder to write the merged model into (must not exist unless --overwrite).")
    parser.add_argument("--alpha", type=float, help="Linear merge: one α in [0, 1] for every tensor.")
    parser.add_argument("--pivots", help="Partwise: inclusive layer pivots, '10,20' or '10#20' → 0–10, 11–20, 21–end.")
    parser.add_argument("--alphas", help="Partwise: one α per part, '0.4,0.3,0.2' or '0.4|0.3|0.2'.")
    parser.add_argument("--embed_alpha", type=float, help="Partwise: α of the input embeddings (default: first part).")
    parser.add_argument("--head_alpha", type=float, help="Partwise: α of lm_head and the final norm (default: last).")
    parser.add_argument("--other_alpha", type=float, help="Partwise: α of tensors no rule covers (default: error).")
    parser.add_argument("--dtype", default="auto", help="Output dtype: auto (aligned's), bfloat16, float16, float32.")
    parser.add_argument("--max_shard_size", default="500MB", help="Largest output shard, e.g. 500MB, 2GB.")
    parser.add_argument("--revision", help="Hub revision for Hub ids.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists (atomically).")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="Upload the merged model (with a model card) here.")
    parser.add_argument("--private", action="store_true", help="With --push_to_hub: create the repo private.")
    add_kebab_aliases(parser)
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    known, _ = parser.parse_known_args(argv)
    if not known.config:
        return
    with open(known.config) as handle:
        recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        parser.error(f"--config {known.config}: expected a mapping of option: value.")
    fields = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in recipe.items():
        dest = key.replace("-", "_")
        if dest not in fields or dest == "config":
            parser.error(
                f"--config {known.config}: unknown field {key!r}; known: {sorted(fields - {'help', 'config'})}."
            )
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        defaults[dest] = value
    parser.set_defaults(**defaults)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _apply_config(parser, argv)
    args = parser.parse_args(argv)
    for field in ("base", "aligned", "output"):
        if not getattr(args, field):
            parser.error(f"--{field} is required.")
    partwise = args.pivots is not None or args.alphas is not None
    if (args.alpha is None) == (not partwise):
        parser.error("give either --alpha (linear) or --alphas [--pivots] (partwise), not both or neither.")

    from hf_align.merging import merge_models, partwise_plan

    plan = None
    if partwise:

        def plan(names, config):
            return partwise_plan(
                names,
                args.pivots or "",
                args.alphas or "",
                embed_alpha=args.embed_alpha,
                head_alpha=args.head_alpha,
                other_alpha=args.other_alpha,
                num_layers=config.get("num_hidden_layers"),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            )

    from hf_align.cli.common import refuse_existing_output

    try:
        refuse_existing_output(args.output, "--output", args.overwrite)
        result = merge_models(
            args.base,
            args.aligned,
            args.output,
            alpha=args.alpha,
            plan=plan,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            revision=args.revision,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"hf-align merge: {err}", file=sys.stderr)
        return 2
    print(result.plan.table())
    print(f"merged {result.num_tensors} tensors into {result.num_shards} shard(s) at {result.output_dir}")
    if args.push_to_hub:
        push_merged(args, result)
    return 0


def push_merged(args, result, api=None):
    """Upload the merged folder with a card that records both inputs and the α per tensor group."""
    from hf_align.hub import merge_model_card, push_folder

    card = merge_model_card(args.base, args.aligned, result.plan, repo=args.push_to_hub)
    return push_folder(result.output_dir, args.push_to_hub, card, private=args.private or None, api=api)


if __name__ == "__main__":
    sys.exit(main())
