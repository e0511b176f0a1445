"""``hf-align select-mask``: choose the neurons alignment may touch, from scores or from two checkpoints.

From neuron scores (written by ``MaskAccumulationCallback``)::

    hf-align select-mask --neuron_scores_path out/warmup --neuron_mask_ratio 0.1 --output_dir out/mask [--plot]

ALLO's recipe (``gen_neuron_mask.py``): score = |θ_trained − θ_init| per entry, one global threshold, keep
the top ``neuron_mask_ratio`` after skipping the top ``neuron_mask_exclude_top``; both checkpoints are streamed
tensor by tensor::

    hf-align select-mask --init base_model --trained warmup_model --neuron_mask_ratio 0.05 --output_dir out/mask

Both write the ``NeuronMask`` into ``--output_dir`` and print how many neurons were selected per module type;
``--plot`` adds ``selection_heatmap.png`` and ``score_distribution.png`` there. The ``neuron_mask_*`` fields are
the trainer configs' (``hf-align masked-dpo --neuron_scores_path ... --neuron_mask_ratio ...`` selects the same
mask inside the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from hf_align.config_checks import CheckedConfig, from_prefixed, option, prefixed_dataclass
from hf_align.errors import UserError
from hf_align.masks import MaskSelection
from hf_align.scores import ScoreOptions


RENAMED = {
    "--scores": "--neuron_scores_path",
    "--output": "--output_dir",
    **{f"--{name}": f"--neuron_mask_{name}" for name in ("ratio", "scope", "select", "exclude_top", "seed")},
    "--granularity": "--neuron_mask_granularity",
}


@dataclass
class SelectMaskArguments(CheckedConfig):
    """Where the scores come from and where the mask goes (the selection: :class:`SelectionArguments`)."""

    output_dir: str = option(help="Folder to write the mask (and plots) into.")
    neuron_scores_path: str | None = option(
        None, help="Folder with neuron_scores.safetensors (MaskAccumulationCallback output)."
    )
    init: str | None = option(
        None, help="Initial checkpoint (folder, .safetensors or .gguf file) for |θ_trained − θ_init|."
    )
    trained: str | None = option(None, help="Trained checkpoint (with --init): folder, .safetensors or .gguf file.")
    target: str | None = option(None, help="Regex on parameter names to restrict the selection.")
    overwrite: bool = option(False, help="Replace a mask, scores or plots already in --output_dir.")
    plot: bool = option(False, help="Also write the heatmap and score-distribution PNGs.")
    push_to_hub: str | None = option(None, help="Also upload the mask (with a card) to this repo id.")


SelectionArguments = prefixed_dataclass(
    "SelectionArguments",
    MaskSelection,
    "neuron_mask_",
    __name__,
    doc="MaskSelection's fields, as the trainers name them.",
)
GranularityArguments = prefixed_dataclass(
    "GranularityArguments",
    ScoreOptions,
    "neuron_mask_",
    __name__,
    exclude=[f.name for f in fields(ScoreOptions) if f.name != "granularity"],
    doc="With --init/--trained: ScoreOptions.granularity, how |θ_trained − θ_init| is scored.",
)


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    types = (SelectMaskArguments, SelectionArguments, GranularityArguments)
    args, selection, scoring = parse_command("hf-align select-mask", types, argv, renamed=RENAMED, description=__doc__)
    selection = from_prefixed(MaskSelection, selection, "neuron_mask_")  # ALLO's band checked before any work
    if (args.neuron_scores_path is None) == (args.init is None):
        raise UserError("give either --neuron_scores_path or --init with --trained, not both or neither.")
    if (args.init is None) != (args.trained is None):
        raise UserError("--init and --trained go together (the checkpoints before and after the warm-up).")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'hf-align[plots]'") from None
    from hf_align.scripts.select_mask import run

    run(args, selection, scoring.neuron_mask_granularity)
    return 0
