"""The trainer registry: one entry per training method, keyed by its CLI command name.

Each :class:`TrainerSpec` names its trainer and config lazily (``"module:Class"``), so importing this module imports
neither torch nor TRL: the command line can list and build its training commands from it, the model cards read their
paper, citation, tags and one-line summary from it, and ``tests/test_trainer_contract.py`` runs the same contract
over every entry.

Adding a method = one trainer file + one entry here (+ its lazy export in ``hf_align/trainers/__init__.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from hf_align.citations import CITATIONS


__all__ = ["LANGUAGE_MODELING", "PREFERENCE", "TRAINERS", "UNPAIRED", "Paper", "TrainerSpec", "spec_for"]

PREFERENCE = (("chosen", "rejected"),)  # a prompt column is optional (TRL extracts an implicit one)
UNPAIRED = (("prompt", "completion", "label"), ("chosen", "rejected"))  # KTO: pairs are unpaired by TRL
LANGUAGE_MODELING = (("prompt", "completion"), ("text",), ("messages",))


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Paper:
    """The method's paper: title, arXiv id (``https://huggingface.co/papers/<id>``) and the citation keys of
    :data:`hf_align.citations.CITATIONS` a card cites (the method's own paper and what it builds on)."""

    title: str
    arxiv_id: str
    cite: tuple[str, ...]

    @property
    def citation(self) -> str:
        """The BibTeX entries, one after the other."""
        return "\n".join(CITATIONS[key] for key in self.cite)


@dataclass(frozen=True)
class TrainerSpec:
    """One training method. ``trainer`` / ``config`` / ``trl_parent``: ``"module:Class"`` paths, imported on use.
    ``trl_parent`` is the TRL trainer it extends (its no-mask behaviour must equal it), None when it has no TRL peer.
    ``columns``: the accepted column sets of the training dataset (any one of them); ``weight_columns``: optional
    per-token weight columns. ``masked``: it takes a ``neuron_mask`` (ALLO's neuron-restricted training)."""

    name: str
    trainer: str
    config: str
    summary: str
    paper: Paper | None = None
    trl_parent: str | None = None
    columns: tuple[tuple[str, ...], ...] = ()
    weight_columns: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    masked: bool = False
    own: bool = field(default=True, metadata={"help": "hf-align's own trainer (False: a TRL trainer the CLI runs)."})
    card_fields: tuple[str, ...] = field(
        default=(),
        metadata={"help": "The method's own config fields its model card always shows (beside the common)."},
    )

    def trainer_class(self) -> type:
        return _import(self.trainer)

    def config_class(self) -> type:
        return _import(self.config)

    def trl_class(self) -> type | None:
        return _import(self.trl_parent) if self.trl_parent else None

    @property
    def paper_dict(self) -> dict:
        """The paper as TRL's trainers spell it (``_paper``: title, id, citation)."""
        if self.paper is None:
            return {}
        return {"title": self.paper.title, "id": self.paper.arxiv_id, "citation": self.paper.citation}


_ALLO = Paper("Learning to Align by Forgetting and Improving: ALLO, Low-Redundant Alignment", "2406.12606", ("allo",))
_T = "hf_align.trainers."

TRAINERS: dict[str, TrainerSpec] = {
    spec.name: spec
    for spec in (
        TrainerSpec(
            "masked-dpo",
            f"{_T}masked_dpo:MaskedDPOTrainer",
            f"{_T}masked_dpo:MaskedDPOConfig",
            "DPO that updates only selected neurons, with token weights (ALLO's improving stage).",
            paper=_ALLO,
            trl_parent="trl:DPOTrainer",
            columns=PREFERENCE,
            weight_columns=("chosen_weights", "rejected_weights"),
            tags=("trl", "dpo", "hf-align", "masked-dpo"),
            masked=True,
            card_fields=("beta", "loss_type"),
        ),
        TrainerSpec(
            "masked-kto",
            f"{_T}masked_kto:MaskedKTOTrainer",
            f"{_T}masked_kto:MaskedKTOConfig",
            "KTO (unpaired desirable/undesirable completions) that updates only selected neurons (ALLO's mask).",
            paper=Paper("KTO: Model Alignment as Prospect Theoretic Optimization", "2402.01306", ("kto", "allo")),
            trl_parent="trl:KTOTrainer",
            columns=UNPAIRED,
            tags=("trl", "kto", "hf-align", "masked-kto"),
            masked=True,
            card_fields=("beta", "desirable_weight", "undesirable_weight"),
        ),
        TrainerSpec(
            "npo",
            f"{_T}npo:NPOTrainer",
            f"{_T}npo_config:NPOConfig",
            "Negative preference optimization: forget completions (sequence- or token-level, masked).",
            paper=Paper(
                "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
                "2404.05868",
                ("npo",),
            ),
            columns=(*LANGUAGE_MODELING, ("conversations",), ("input_ids",), ("prompt", "rejected")),
            weight_columns=("completion_weights", "rejected_weights"),
            tags=("trl", "hf-align", "npo"),
            masked=True,
            card_fields=("beta", "npo_loss_type", "npo_level", "retain_loss_type", "retain_weight"),
        ),
        TrainerSpec(
            "feedback",
            f"{_T}feedback_conditioned:FeedbackConditionedTrainer",
            f"{_T}feedback_conditioned_config:FeedbackConditionedConfig",
            "Feedback-conditioned training (ALT / Quark): sample, score, pool, train on feedback.",
            paper=Paper(
                "Quark: Controllable Text Generation with Reinforced Unlearning", "2205.13636", ("quark", "alt")
            ),
            columns=(("prompt",), ("prompt", "completion", "feedback")),
            tags=("trl", "hf-align", "alt", "quark"),
            card_fields=("feedback_type", "num_quantiles", "beta", "num_rounds", "num_generations"),
        ),
        TrainerSpec(
            "adaptive-merge",
            f"{_T}adaptive_merge:AdaptiveMergeTrainer",
            f"{_T}adaptive_merge:AdaptiveMergeConfig",
            "Learn per-block averaging ratios on data (adaptive AMA), then merge.",
            paper=Paper("Mitigating the Alignment Tax of RLHF", "2309.06256", ("ama",)),
            columns=LANGUAGE_MODELING,
            tags=("hf-align", "ama", "model-merging"),
            card_fields=("mask_level", "init_val", "reg_alpha", "reg_type"),
        ),
        # TRL's own trainers behind HFAlignTrainerMixin (trl_commands.py): the CLI checks their columns
        TrainerSpec(
            "warmup-dpo",
            f"{_T}trl_commands:WarmupDPOTrainer",
            f"{_T}trl_commands:WarmupDPOConfig",
            "DPO with MaskAccumulationCallback: find the neurons alignment uses (ALLO stage 1).",
            paper=_ALLO,
            trl_parent="trl:DPOTrainer",
            columns=PREFERENCE,
            own=False,
            tags=("trl", "dpo", "hf-align", "allo-warmup"),
            card_fields=("beta", "loss_type"),
        ),
        TrainerSpec(
            "aligner-sft",
            f"{_T}trl_commands:AlignerSFTTrainer",
            f"{_T}trl_commands:AlignerSFTConfig",
            "SFT with an Aligner adapter (N global tokens shared by all layers).",
            paper=Paper(
                "Aligner: One Global Token is Worth Millions of Parameters When Aligning Large Language Models",
                "2312.05503",
                ("aligner",),
            ),
            trl_parent="trl:SFTTrainer",
            columns=LANGUAGE_MODELING,
            own=False,
            tags=("trl", "sft", "hf-align", "aligner", "peft"),
        ),
        TrainerSpec(
            "aligner-dpo",
            f"{_T}trl_commands:AlignerDPOTrainer",
            f"{_T}trl_commands:AlignerDPOConfig",
            "DPO with an Aligner adapter (reference = adapter disabled).",
            paper=Paper(
                "Aligner: One Global Token is Worth Millions of Parameters When Aligning Large Language Models",
                "2312.05503",
                ("aligner",),
            ),
            trl_parent="trl:DPOTrainer",
            columns=PREFERENCE,
            own=False,
            tags=("trl", "dpo", "hf-align", "aligner", "peft"),
            card_fields=("beta", "loss_type"),
        ),
    )
}


def spec_for(cls: type) -> TrainerSpec | None:
    """The entry of hf-align's trainer ``cls`` or of the nearest registered class it derives from (a user's
    subclass keeps its parent's card); None for a class outside the registry."""
    own = {spec.trainer: spec for spec in TRAINERS.values() if spec.own}
    for klass in cls.__mro__:
        spec = own.get(f"{klass.__module__}:{klass.__qualname__}")
        if spec is not None:
            return spec
    return None
