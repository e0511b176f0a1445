"""``hf-align warmup-dpo``: TRL's DPO with ``MaskAccumulationCallback`` — ALLO's stage 1 (find the neurons).

Parses what ``trl dpo`` parses plus the callback's ``score_``/``select_`` fields: every ``trl dpo`` recipe runs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_align.cli.common import PREFERENCE_COLUMNS, make_trl_parser, train_command


@dataclass
class NeuronScoreArguments:
    """Recipe fields of the ``MaskAccumulationCallback`` (the ``score_``/``select_`` prefixes keep them apart)."""

    score_method: str = field(
        default="weight_diff", metadata={"help": "'weight_diff' (|θ_end − θ_start|, ALLO) or 'gradient'."}
    )
    score_granularity: str = field(
        default="element", metadata={"help": "'element' (ALLO: every parameter entry) or 'row' (one neuron per row)."}
    )
    score_grad_stage: str = field(
        default="pre_clip", metadata={"help": "Gradient method only: read gradients 'pre_clip' or 'post_clip'."}
    )
    score_dtype: str = field(
        default="float32", metadata={"help": "Accumulator dtype for element-granularity gradient scores."}
    )
    select_ratio: float | None = field(
        default=None,
        metadata={"help": "If set, also write the top-`select_ratio` NeuronMask to output_dir/neuron_mask."},
    )
    select_scope: str = field(default="global", metadata={"help": "'global' (ALLO: one threshold) or 'tensor'."})
    select_exclude_top: float = field(
        default=0.0, metadata={"help": "Fraction of the very top scores to leave out first (ALLO's band l..r)."}
    )


def make_parser(prog: str | None = None, command: str = "warmup-dpo"):
    from trl import DPOConfig

    return make_trl_parser(DPOConfig, prog or f"hf-align {command}", extra=(NeuronScoreArguments,), mixture=True)


def run(script_args, training_args, model_args, dataset_args, score_args, command: str = "warmup-dpo") -> int:
    from trl import DPOTrainer

    from hf_align.callbacks import MaskAccumulationCallback

    callback = MaskAccumulationCallback(
        method=score_args.score_method,
        granularity=score_args.score_granularity,
        grad_stage=score_args.score_grad_stage,
        score_dtype=score_args.score_dtype,
        select_ratio=score_args.select_ratio,
        select_scope=score_args.select_scope,
        exclude_top=score_args.select_exclude_top,
    )
    return train_command(
        DPOTrainer, script_args, training_args, model_args, dataset_args, PREFERENCE_COLUMNS, callbacks=[callback]
    )
