"""``NPOConfig``: the options of :class:`~hf_align.trainers.NPOTrainer`, in a file of its own as TRL keeps
``sft_config.py`` beside ``sft_trainer.py``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import SFTConfig

from hf_align.config_checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, option
from hf_align.errors import UserError
from hf_align.trainers._base import PlotArguments, TokenWeightArguments
from hf_align.trainers._masking import NeuronMaskArguments


REF_COLUMN = "ref_token_logps"
"""Precomputed reference log-probs: one float per position of ``input_ids`` (that token's log-prob; 0 on the prompt)."""


@dataclass
class NPOConfig(NeuronMaskArguments, TokenWeightArguments, PlotArguments, SFTConfig):
    """``trl.SFTConfig`` (tokenization, truncation, model loading) plus NPO's loss, reference and mask options."""

    beta: float = option(
        0.1,
        help="NPO/SimNPO temperature β (ALLO and the NPO paper use 0.1). The loss at init is 2·ln2/β.",
        range=POSITIVE,
    )
    npo_loss_type: str = option(
        "npo",
        help="'npo' (with a reference policy) or 'simnpo' (reference-free, length-normalized).",
        choices=("npo", "simnpo"),
    )
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "SFTConfig's own loss type; NPO computes its loss itself, so keep 'nll'. 'npo' / 'simnpo' are "
            "the deprecated spelling of npo_loss_type.",
            "choices": ["nll", "chunked_nll", "npo", "simnpo"],
        },
    )
    npo_level: str = option(
        "sequence",
        help="'sequence': −(2/β)·log σ(−β·Σ_t w_t·logratio_t) per example (NPO paper). 'token': ALLO's "
        "Σ_t −w_t·log σ(−β·logratio_t) / #{w_t≠0} over the batch.",
        choices=("sequence", "token"),
    )
    simnpo_gamma: float = field(default=0.0, metadata={"help": "SimNPO's reward margin γ (npo_loss_type='simnpo')."})
    retain_loss_type: str = option(
        "nll",
        help="Retain term on `retain_dataset`: 'nll' or 'kl' (KL(π_ref‖πθ) per retain token).",
        choices=("nll", "kl"),
    )
    retain_weight: float = option(
        1.0, help="Weight of the retain term (used only when a retain dataset is given).", range=NON_NEGATIVE
    )
    retain_batch_size: int | None = option(
        None,
        help="Retain examples drawn per forget micro-batch; None uses per_device_train_batch_size.",
        range=AT_LEAST_ONE,
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference per-token log-probs once before training (stored as the "
            f"`{REF_COLUMN}` column) so no reference forward runs while training. Without a `ref_model`, the "
            "policy at initialization is the reference (under FSDP, as in DPO, a copy used only for the precompute)."
        },
    )
    precompute_ref_batch_size: int | None = option(
        None, help="Batch size for precomputing; None uses per_device_train_batch_size.", range=AT_LEAST_ONE
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the policy and reference (log-ratios must be exact)."}
    )

    def __post_init__(self):
        if self.loss_type in ("npo", "simnpo"):  # NPO's selector once shadowed SFT's: the old spelling still works
            if self.npo_loss_type not in ("npo", self.loss_type):
                raise ValueError(f"loss_type={self.loss_type!r} contradicts npo_loss_type={self.npo_loss_type!r}.")
            msg = f"NPOConfig(loss_type={self.loss_type!r}) is deprecated: use npo_loss_type (loss_type is SFT's)."
            warnings.warn(msg, FutureWarning, stacklevel=3)
            self.npo_loss_type, self.loss_type = self.loss_type, "nll"
        super().__post_init__()
        if self.npo_loss_type == "simnpo" and self.npo_level != "sequence":
            raise ValueError("npo_loss_type='simnpo' is a sequence-level loss; set npo_level='sequence'.")
        if self.packing or self.padding_free:
            raise UserError(
                "NPO scores each forget sequence on its own (one log-ratio against the reference per example): "
                "packing and padding_free join sequences, so they must be False."
            )
        if self.label_smoothing_factor:
            raise UserError("label_smoothing_factor: NPO's loss is not an NLL, there is nothing to smooth; set 0.")
