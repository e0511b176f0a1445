"""TRL's own trainers as the ``warmup-dpo``, ``aligner-sft`` and ``aligner-dpo`` commands run them: with
:class:`~hf_align.trainers._base.HFAlignTrainerMixin` in front, so they keep every guarantee hf-align's trainers give
(config checks, JSON training arguments and no pickle in any save or push, hf-align's card, no local path in the
adapter config, the base model's dtype and config in what they save), and nothing else changes: same losses and
steps as the TRL trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from hf_align.trainers._base import HFAlignTrainerMixin, PlotArguments


__all__ = [
    "AlignerDPOConfig",
    "AlignerDPOTrainer",
    "AlignerSFTConfig",
    "AlignerSFTTrainer",
    "WarmupDPOConfig",
    "WarmupDPOTrainer",
]


@dataclass
class WarmupDPOConfig(PlotArguments, DPOConfig):
    """``trl.DPOConfig``, checked as hf-align's configs are (ALLO's warm-up stage)."""


class WarmupDPOTrainer(HFAlignTrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` with hf-align's saves and card. Its product is the neuron scores and mask that
    :class:`~hf_align.callbacks.MaskAccumulationCallback` writes, so the final save writes no copy of the model
    (checkpoints keep theirs, for resuming)."""

    _name = "Warm-up DPO"
    gguf_by_name = True
    final_save_weights = False


@dataclass
class AlignerSFTConfig(PlotArguments, SFTConfig):
    """``trl.SFTConfig``, checked as hf-align's configs are (the Aligner adapter comes as ``peft_config``)."""


class AlignerSFTTrainer(HFAlignTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training an Aligner adapter, with hf-align's saves and card."""

    _name = "Aligner SFT"
    gguf_by_name = True


@dataclass
class AlignerDPOConfig(PlotArguments, DPOConfig):
    """``trl.DPOConfig``, checked as hf-align's configs are (reference = the adapter disabled)."""


class AlignerDPOTrainer(HFAlignTrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` training an Aligner adapter, with hf-align's saves and card."""

    _name = "Aligner DPO"
    gguf_by_name = True
