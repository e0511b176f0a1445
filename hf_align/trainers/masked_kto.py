"""Masked KTO: ``trl.KTOTrainer`` that trains only the neurons of an ALLO neuron mask.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) learns from unpaired completions labelled desirable / undesirable;
ALLO's mask (arXiv 2406.12606) restricts any preference method to the neurons alignment uses. With a mask, the
selected rows/entries train as deltas on a frozen base and the reference is the same model with its deltas off (no
second copy); without one, this is ``trl.KTOTrainer`` itself, step for step (``tests/test_trainer_contract.py``).
Data: ``prompt`` + ``completion`` + ``label`` (bool), or preference pairs, which TRL unpairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import KTOConfig, KTOTrainer

from hf_align.trainers._base import HFAlignTrainerMixin, PlotArguments
from hf_align.trainers._masking import NeuronMaskArguments, NeuronMaskTrainerMixin


__all__ = ["MaskedKTOConfig", "MaskedKTOTrainer"]


@dataclass
class MaskedKTOConfig(NeuronMaskArguments, PlotArguments, KTOConfig):
    """``trl.KTOConfig`` plus the neuron-mask options (``neuron_mask_path``, ``neuron_scores_path`` + ratio, ...)."""


class MaskedKTOTrainer(HFAlignTrainerMixin, NeuronMaskTrainerMixin, KTOTrainer):
    """``trl.KTOTrainer`` that trains only the neurons of a ``NeuronMask``.

    Args (beyond ``trl.KTOTrainer``'s):
        neuron_mask: a ``NeuronMask``, a directory saved with ``NeuronMask.save``, or None (then the config's
            ``neuron_mask_path`` / ``neuron_scores_path`` + ``neuron_mask_ratio``; with none of them all parameters
            train, exactly like ``trl.KTOTrainer``). Without a ``ref_model`` the reference is the policy with its
            deltas off.

    ``__init__`` is :class:`NeuronMaskTrainerMixin`'s (dataset columns: the registry's "masked-kto" entry).
    """

    _name = "MaskedKTO"  # tags and paper: the registry's "masked-kto" entry
