"""``hf-align select-mask``: choose the neurons alignment may touch, from scores or from two checkpoints.

From neuron scores (written by ``MaskAccumulationCallback``)::

    hf-align select-mask --scores out/warmup --ratio 0.1 --scope global --output out/mask [--select top] [--plot]

ALLO's recipe (``gen_neuron_mask.py``): score = |θ_trained − θ_init| per entry, one global threshold, keep
the top ``ratio`` after skipping the top ``exclude_top``; both checkpoints are streamed tensor by tensor::

    hf-align select-mask --init base_model --trained warmup_model --ratio 0.05 [--exclude-top 0.0] --output out/mask

Both write the ``NeuronMask`` into ``--output`` and print how many neurons were selected per module type;
``--plot`` adds ``selection_heatmap.png`` and ``score_distribution.png`` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections import defaultdict
from pathlib import Path

import torch

from hf_align.cli.common import add_kebab_aliases
from hf_align.config_checks import from_prefixed
from hf_align.masks import MaskSelection
from hf_align.scores import META_FILE as SCORES_META
from hf_align.scores import SCORES_FILE, ScoreOptions, load_scores, save_scores, weight_diff_scores


HEATMAP_FILE = "selection_heatmap.png"
DISTRIBUTION_FILE = "score_distribution.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-align select-mask",
        description="Select a neuron mask from saved scores or from two checkpoints (ALLO's recipe).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", help="Folder with neuron_scores.safetensors (MaskAccumulationCallback output).")
    source.add_argument("--init", help="Initial checkpoint (folder or .safetensors) for |θ_trained − θ_init|.")
    parser.add_argument("--trained", help="Trained checkpoint (with --init).")
    _add_options(parser, MaskSelection, required=("ratio",))  # --ratio --scope --select --exclude_top --seed
    _add_options(parser, ScoreOptions, names=("granularity",))  # with --init/--trained: per entry or per row
    parser.add_argument("--target", default=None, help="Regex on parameter names to restrict the selection.")
    parser.add_argument("--output", required=True, help="Folder to write the mask (and plots) into.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a mask, scores or plots already in --output."
    )
    parser.add_argument("--plot", action="store_true", help="Also write the heatmap and score-distribution PNGs.")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="Also upload the mask (with a model card) here.")
    add_kebab_aliases(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init and not args.trained:
        parser.error("--init needs --trained (the checkpoint after the warm-up).")
    if args.trained and not args.init:
        parser.error("--trained needs --init.")
    selection = from_prefixed(MaskSelection, args, "")  # every range and choice checked, before any work
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("hf-align select-mask: --plot needs matplotlib: pip install 'hf-align[plots]'", file=sys.stderr)
            return 2
    from hf_align.cli.common import refuse_existing_output
    from hf_align.masks import MASK_FILE, MASK_META_FILE

    written = [MASK_FILE, MASK_META_FILE, *((SCORES_FILE, SCORES_META) if args.init else ())]
    written += [HEATMAP_FILE, DISTRIBUTION_FILE] if args.plot else []
    refuse_existing_output(args.output, "--output", args.overwrite, names=written)  # before any work
    try:  # the other errors print as one line through hf_align.cli.run_guarded
        scores = _load_or_compute_scores(args)
    except KeyError as err:  # a tensor missing from a checkpoint
        raise ValueError(err.args[0]) from None
    from hf_align.masks import NeuronMask

    mask = NeuronMask.from_scores(scores, selection)
    output = Path(args.output)
    mask.save(output)
    if args.init:
        save_scores(output, scores, {"method": "weight_diff", "granularity": args.granularity, "statistic": "abs"})
    print(format_summary(mask.masks))
    if args.plot:
        from hf_align.plots import plot_score_distribution, plot_selection_heatmap

        plot_selection_heatmap(mask, output / HEATMAP_FILE)
        threshold = selection_threshold(scores, mask.masks) if args.select == "top" else None
        plot_score_distribution(scores, output / DISTRIBUTION_FILE, threshold=threshold)
        print(f"plots: {output / HEATMAP_FILE}, {output / DISTRIBUTION_FILE}")
    print(f"mask written to {output}")
    if args.push_to_hub:
        from hf_align.hub import push_neuron_mask

        push_neuron_mask(mask, args.push_to_hub)
        print(f"mask pushed to {args.push_to_hub}")
    return 0


def _add_options(
    parser: argparse.ArgumentParser, options: type, required: tuple[str, ...] = (), names: tuple[str, ...] = ()
) -> None:
    """One ``--<field>`` per field of the dataclass ``options`` (or of ``names``), with its declared default, help
    and choices (ranges are checked when the dataclass is built from the parsed values)."""
    hints = typing.get_type_hints(options)
    for f in dataclasses.fields(options):
        if names and f.name not in names:
            continue
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        extra = {"required": True} if f.name in required else {"default": f.default}
        choices = f.metadata.get("choices")
        parser.add_argument(f"--{f.name}", type=kind, choices=choices, help=f.metadata["help"], **extra)


def _load_or_compute_scores(args) -> dict[str, torch.Tensor]:
    if args.scores:
        scores, _ = load_scores(args.scores)
        if args.target:
            scores = {k: v for k, v in scores.items() if re.search(args.target, k)}
            if not scores:
                raise ValueError(f"--target {args.target!r} matches no parameter in {args.scores!r}.")
        return scores
    return weight_diff_scores(args.init, args.trained, granularity=args.granularity, target=args.target)


def module_type(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` → ``down_proj``; ``model.norm.weight`` → ``norm``."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        return parts[-2]
    return parts[-1]


def format_summary(masks: dict[str, torch.Tensor]) -> str:
    """Per module type: selected / total units (rows or entries, as stored) and the fraction."""
    selected: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for name, tensor in masks.items():
        kind = module_type(name)
        selected[kind] += int((tensor != 0).sum())
        total[kind] += tensor.numel()
    width = max(len("module"), *(len(k) for k in total))
    lines = [f"{'module':<{width}}  {'selected':>12}  {'total':>12}  fraction"]
    for kind in sorted(total):
        lines.append(f"{kind:<{width}}  {selected[kind]:>12,}  {total[kind]:>12,}  {selected[kind] / total[kind]:.4f}")
    all_selected, all_total = sum(selected.values()), sum(total.values())
    lines.append(f"{'all':<{width}}  {all_selected:>12,}  {all_total:>12,}  {all_selected / max(all_total, 1):.4f}")
    return "\n".join(lines)


def selection_threshold(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float | None:
    """The smallest selected score (where masks and scores have the same shape), for the histogram."""
    values = []
    for name, mask in masks.items():
        score = scores.get(name)
        if score is not None and score.shape == mask.shape and bool((mask != 0).any()):
            values.append(score[mask != 0].min())
    return float(torch.stack(values).min()) if values else None


if __name__ == "__main__":
    sys.exit(main())
