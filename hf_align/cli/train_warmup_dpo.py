"""``hf-align warmup-dpo``: TRL's DPO with ``MaskAccumulationCallback`` — ALLO's stage 1 (find the neurons).

Parses what ``trl dpo`` parses plus the callback's ``score_``/``select_`` fields: every ``trl dpo`` recipe runs here.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_align.cli.common import PREFERENCE_COLUMNS, make_trl_parser, train_command
from hf_align.config_checks import from_prefixed, prefixed_dataclass
from hf_align.masks import MaskSelection
from hf_align.scores import ScoreOptions


_ScoreFields = prefixed_dataclass("_ScoreFields", ScoreOptions, "score_", __name__)
_SelectFields = prefixed_dataclass("_SelectFields", MaskSelection, "select_", __name__, exclude=("seed",))


@dataclass
class NeuronScoreArguments(_SelectFields, _ScoreFields):
    """Recipe fields of the ``MaskAccumulationCallback``: :class:`~hf_align.scores.ScoreOptions` as ``score_*`` and
    :class:`~hf_align.masks.MaskSelection` as ``select_*`` (the training ``seed`` seeds ``select: random``)."""


def make_parser(prog: str | None = None, command: str = "warmup-dpo"):
    from trl import DPOConfig

    return make_trl_parser(DPOConfig, prog or f"hf-align {command}", extra=(NeuronScoreArguments,), mixture=True)


def run(script_args, training_args, model_args, dataset_args, score_args, command: str = "warmup-dpo") -> int:
    from trl import DPOTrainer

    from hf_align.callbacks import MaskAccumulationCallback

    callback = MaskAccumulationCallback(
        options=from_prefixed(ScoreOptions, score_args, "score_"),
        selection=from_prefixed(MaskSelection, score_args, "select_", seed=training_args.seed),
    )
    return train_command(
        DPOTrainer, script_args, training_args, model_args, dataset_args, PREFERENCE_COLUMNS, callbacks=[callback]
    )
