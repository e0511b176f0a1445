"""What ``hf-align select-mask`` runs (:mod:`hf_align.cli.select_mask` parses): scores from a folder or from two
checkpoints, :meth:`NeuronMask.from_scores`, the per-module summary, the plots and the upload."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from pathlib import Path

import torch

from hf_align.architectures import checkpoint_parameter_order
from hf_align.errors import UserError
from hf_align.io import PARAMETER_ORDER
from hf_align.masks import MaskSelection, NeuronMask
from hf_align.scores import META_FILE as SCORES_META
from hf_align.scores import SCORES_FILE, checkpoint_neuron_sizes, load_scores, save_scores, weight_diff_scores


HEATMAP_FILE = "selection_heatmap.png"
DISTRIBUTION_FILE = "score_distribution.png"


def run(args, selection: MaskSelection, granularity: str = "element") -> NeuronMask:
    """Select with ``selection`` as ``args`` (:class:`hf_align.cli.select_mask.SelectMaskArguments`) asks: refuse to
    replace what it writes (before any work), write the mask (and the scores, the plots), print the summary.
    ``granularity``: ScoreOptions.granularity of the scores computed from ``--init``/``--trained``."""
    from hf_align.masks import MASK_FILE, MASK_META_FILE
    from hf_align.scripts.utils import refuse_existing_output

    written = [MASK_FILE, MASK_META_FILE, *((SCORES_FILE, SCORES_META) if args.init else ())]
    written += [HEATMAP_FILE, DISTRIBUTION_FILE] if args.plot else []
    refuse_existing_output(args.output_dir, "--output_dir", args.overwrite, names=written)  # before any work
    try:
        scores, sizes, model_order = _load_or_compute_scores(args, granularity)
    except KeyError as err:  # a tensor missing from a checkpoint
        raise UserError(err.args[0]) from None
    mask = NeuronMask.from_scores(scores, selection, neuron_sizes=sizes, progress=True)
    output = Path(args.output_dir)
    mask.save(output)
    if args.init:
        meta = {"method": "weight_diff", "granularity": granularity, "statistic": "abs"}
        meta["neuron_sizes"] = {name: sizes[name] for name in scores if scores[name].dim() == 1}
        save_scores(output, scores, meta)
    print(format_summary(mask))
    if args.plot:
        from hf_align.plots import plot_score_distribution, plot_selection_heatmap

        plot_selection_heatmap(mask, output / HEATMAP_FILE, order=list(mask.masks) if model_order else None)
        threshold = selection_threshold(scores, mask.masks) if selection.select == "top" else None
        plot_score_distribution(scores, output / DISTRIBUTION_FILE, threshold=threshold)
        print(f"plots: {output / HEATMAP_FILE}, {output / DISTRIBUTION_FILE}")
    print(f"mask written to {output}")
    if args.push_to_hub:
        from hf_align.hub import push_neuron_mask

        push_neuron_mask(mask, args.push_to_hub, base_model=base_model_of(args))
        print(f"mask pushed to {args.push_to_hub}")
    return mask


def base_model_of(args) -> str | None:
    """The Hub id of the model the mask selects neurons of: the --init checkpoint's, or the one named by the card
    beside the scores (a warm-up's output_dir, or a scores repo's card); ``None`` when neither says."""
    from hf_align.hub import card_base_model, hub_id
    from hf_align.hub_download import resolve_local

    if args.init:
        return hub_id(str(args.init))
    try:  # the scores are already read, so only a missing card can fail here
        folder = resolve_local(args.neuron_scores_path, None, ["README.md"], what="neuron scores card")
    except FileNotFoundError:
        return None
    return card_base_model(folder)


def _load_or_compute_scores(args, granularity: str) -> tuple[dict[str, torch.Tensor], dict[str, int] | None, bool]:
    """The scores, the row lengths ``budget="params"`` counts (from the checkpoint, or the scores' header), and
    whether the scores are in the model's parameter order (saved with it, or read from the checkpoint's config)."""
    if args.neuron_scores_path:
        scores, meta = load_scores(args.neuron_scores_path)
        if args.target:
            scores = {k: v for k, v in scores.items() if re.search(args.target, k)}
            if not scores:
                raise UserError(f"--target {args.target!r} matches no parameter in {args.neuron_scores_path!r}.")
        return scores, meta.get("neuron_sizes"), PARAMETER_ORDER in meta
    from hf_align.loading import gguf_as_checkpoints

    with contextlib.ExitStack() as stack:  # a .gguf checkpoint is read from a temporary safetensors copy
        init, trained = gguf_as_checkpoints(stack, args.init, args.trained)
        scores = weight_diff_scores(init, trained, granularity=granularity, target=args.target, progress=True)
        return scores, checkpoint_neuron_sizes(init), checkpoint_parameter_order(init) is not None


def module_type(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` → ``down_proj``; ``model.norm.weight`` → ``norm``."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        return parts[-2]
    return parts[-1]


def format_summary(mask) -> str:
    """Per module type: selected / total units (rows or entries, as stored), their fraction and -- when the row
    lengths are known -- the fraction of the *weights* trained (a row counts its length)."""
    sizes = mask.neuron_sizes
    selected: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # units, of units, params, of params
    for name, tensor in mask.masks.items():
        row = selected[module_type(name)]
        size = sizes[name] if sizes else 1
        row[0] += int(tensor.sum())
        row[1] += tensor.numel()
        row[2] += int(tensor.sum()) * size
        row[3] += tensor.numel() * size
    rows = sorted(selected.items())
    rows.append(("all", [sum(r[i] for _, r in rows) for i in range(4)]))
    width = max(len("module"), *(len(k) for k, _ in rows))
    params = "  params" if sizes else ""
    lines = [f"{'module':<{width}}  {'selected':>12}  {'total':>12}  fraction{params}"]
    for kind, (units, of_units, weights, of_weights) in rows:
        share = f"  {weights / max(of_weights, 1):.4f}" if sizes else ""
        lines.append(
            f"{kind:<{width}}  {units:>12,}  {of_units:>12,}  {units / max(of_units, 1):.4f}  {share}".rstrip()
        )
    return "\n".join(lines)


def selection_threshold(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float | None:
    """The smallest selected score (where masks and scores have the same shape), for the histogram."""
    values = []
    for name, mask in masks.items():
        score = scores.get(name)
        if score is not None and score.shape == mask.shape and bool((mask != 0).any()):
            values.append(score[mask != 0].min())
    return float(torch.stack(values).min()) if values else None
