"""Masked KTO: ``trl.KTOTrainer`` that trains only the neurons of an ALLO neuron mask.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) learns from unpaired completions labelled desirable / undesirable;
ALLO's mask (arXiv 2406.12606) restricts any preference method to the neurons alignment uses. With a mask, the
selected rows/entries train as deltas on a frozen base and the reference is the same model with its deltas off (no
second copy); without one, this is ``trl.KTOTrainer`` itself, step for step (``tests/test_trainer_contract.py``).
Data: ``prompt`` + ``completion`` + ``label`` (bool), or preference pairs, which TRL unpairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.utils import logging
from trl import KTOConfig, KTOTrainer

from hf_align.trainers._base import HFAlignTrainerMixin, resolve_args
from hf_align.trainers._data_checks import check_dataset
from hf_align.trainers._masking import NeuronMaskArguments, NeuronMaskTrainerMixin
from hf_align.trainers.registry import TRAINERS


__all__ = ["MaskedKTOConfig", "MaskedKTOTrainer"]

logger = logging.get_logger(__name__)

KTO_COLUMNS = TRAINERS["masked-kto"].columns  # unpaired examples, or preference pairs (unpaired by TRL)


@dataclass
class MaskedKTOConfig(NeuronMaskArguments, KTOConfig):
    """``trl.KTOConfig`` plus the neuron-mask options (``neuron_mask_path``, ``neuron_scores_path`` + ratio, ...)."""


class MaskedKTOTrainer(HFAlignTrainerMixin, NeuronMaskTrainerMixin, KTOTrainer):
    """``trl.KTOTrainer`` that trains only the neurons of a ``NeuronMask``.

    Args (beyond ``trl.KTOTrainer``'s):
        neuron_mask: a ``NeuronMask``, a directory saved with ``NeuronMask.save``, or None (then the config's
            ``neuron_mask_path`` / ``neuron_scores_path`` + ``neuron_mask_ratio``; with none of them all parameters
            train, exactly like ``trl.KTOTrainer``). Without a ``ref_model`` the reference is the policy with its
            deltas off.
    """

    _name = "MaskedKTO"  # tags and paper: the registry's "masked-kto" entry

    def __init__(
        self,
        model,
        ref_model=None,
        args: MaskedKTOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        neuron_mask=None,
        peft_config=None,
        **kwargs,
    ):
        args = resolve_args(args, MaskedKTOConfig, KTOConfig, model, self._name)
        check_dataset(train_dataset, "train_dataset", KTO_COLUMNS)
        check_dataset(eval_dataset, "eval_dataset", KTO_COLUMNS)
        model, ref_model = self._load_and_mask(model, ref_model, args, neuron_mask, peft_config, kwargs)
        self._init_library_trainer(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        logger.warning(f"MaskedKTOTrainer: trainable fraction of parameters = {self._set_trainable_fraction():.6f}")
