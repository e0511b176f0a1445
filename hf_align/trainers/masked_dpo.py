"""DPO that updates only selected neurons and weighs completion tokens (ALLO's improving stage, done lean).

``MaskedDPOTrainer`` is ``trl.DPOTrainer`` plus three narrow additions:

* **Neuron masks** (``hf_align.masks``): the base weights are frozen and trainable deltas exist only at the selected
  rows/entries (``hf_align.sparse_update.attach_deltas``). The reference policy is the same model with its deltas
  switched off, so no second copy lives in memory (unless ``ref_model`` is given).
* **Token weights** (``hf_align.token_weights``): ``chosen_weights`` / ``rejected_weights`` columns turn the sequence
  log-prob into ``Σ_t w_t log π(y_t|·)`` for policy and reference, live or precomputed.
* **Dynamic rejected-token selection** (``rejected_token_ratio``): only the ε fraction of rejected tokens with the
  lowest ``log πθ − log π_ref`` count, as in ALLO's ``gen_mask``.

TRL's ``_compute_loss`` is not copied: weights are applied by wrapping the (fused-LM-head) forward of the models so
the per-token log-probs TRL sums come back already weighted. Without mask, weights or token ratio the trainer runs
exactly TRL's code path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from hf_align import _compat
from hf_align.config_checks import FRACTION, option
from hf_align.token_weights import (
    check_weight_columns,
    ld_alpha_multiplier,
    normalize_weight_columns,
    select_lowest_ratio_tokens,
    sequence_weights,
)
from hf_align.trainers._base import HFAlignTrainerMixin, PlotArguments, TokenWeightArguments
from hf_align.trainers._data_checks import check_not_truncated_away, column_names
from hf_align.trainers._masking import DeltasOffReference, NeuronMaskArguments, NeuronMaskTrainerMixin


_PAIR_WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")


@dataclass
class MaskedDPOConfig(NeuronMaskArguments, TokenWeightArguments, PlotArguments, DPOConfig):
    """``trl.DPOConfig`` plus neuron-mask and token-weight options (see ``docs/masked_dpo.md``)."""

    rejected_token_ratio: float | None = option(
        None,
        help="ALLO's ε: on the rejected side only this fraction of completion tokens with the lowest "
        "log πθ − log π_ref counts (chosen side sums all tokens). None disables the selection.",
        range=FRACTION,
    )


@dataclass
class DataCollatorForWeightedPreference(DataCollatorForPreference):
    """TRL's preference collator plus ``token_weights``: per-token weights aligned to the shifted labels.

    ``token_weights[i, j]`` weighs the log-prob of ``input_ids[i, j + 1]`` (what the fused LM head returns at ``j``);
    it is 0 outside the completion and present only when an example carries a weights column.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if not any(name in examples[0] for name in _PAIR_WEIGHT_COLUMNS):
            return output
        sl = None
        if self.max_length is not None:
            sl = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
        rows = []
        for side in ("chosen", "rejected"):
            for example in examples:
                rows.append(
                    sequence_weights(
                        len(example["prompt_ids"]),
                        example.get(f"{side}_weights"),
                        len(example[f"{side}_ids"]),
                        sl,
                    )
                )
        width = output["input_ids"].shape[1]
        weights = torch.zeros(len(rows), width, dtype=torch.float32)
        for i, row in enumerate(rows):
            weights[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        output["token_weights"] = weights[:, 1:] * output["completion_mask"][:, 1:]
        return output


class _WeightingState:
    """What the wrapped forwards apply; inactive outside ``compute_loss`` (generation, saving are untouched)."""

    def __init__(self):
        self.active = False
        self.weights: torch.Tensor | None = None  # (2B, L-1) static weights or None (= 1 on the completion)
        self.ref_token_logps: torch.Tensor | None = None  # set in dynamic-selection mode
        self.inputs: dict | None = None  # where the reference sums are written in dynamic-selection mode
        self.trainer: MaskedDPOTrainer | None = None
        self.captured: torch.Tensor | None = None  # capture mode: the last per-token log-probs
        self.capture = False


def _wrap_fused_forward(module: torch.nn.Module, state: _WeightingState) -> None:
    """Wrap ``module.forward`` (already TRL's fused-LM-head forward) so its ``log_probs`` come back weighted."""
    if getattr(module.forward, "_hf_align_weighted", False):
        return
    inner = module.forward

    def forward(*args, **kwargs):
        outputs = inner(*args, **kwargs)
        if not state.active or not kwargs.get("fused_lm_head", False):
            return outputs
        outputs.log_probs = state.trainer._weigh_log_probs(outputs.log_probs, kwargs["labels"])
        return outputs

    forward._hf_align_weighted = True
    module.forward = forward


class MaskedDPOTrainer(HFAlignTrainerMixin, NeuronMaskTrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` that trains only the neurons of a ``NeuronMask`` and supports per-token weights.

    Args (beyond ``trl.DPOTrainer``'s):
        neuron_mask: a ``NeuronMask``, a directory saved with ``NeuronMask.save``, or None (then the config's
            ``neuron_mask_path`` / ``neuron_scores_path`` + ``neuron_mask_ratio`` are used; with none of them all
            parameters train, exactly like ``trl.DPOTrainer``).
    """

    _name = "MaskedDPO"  # tags and paper: the registry's "masked-dpo" entry
    extra_signature_columns = _PAIR_WEIGHT_COLUMNS
    weighted_collator = (DataCollatorForPreference, DataCollatorForWeightedPreference)

    def _before_library_init(self, args) -> None:
        self._weighting = _WeightingState()
        self._weighting.trainer = self
        self.rejected_token_ratio = args.rejected_token_ratio
        if args.rejected_token_ratio is not None and args.precompute_ref_log_probs:
            raise ValueError(
                "rejected_token_ratio needs per-token reference log-probs at every step; it cannot be combined with "
                "precompute_ref_log_probs=True (TRL stores only sequence sums). Set one of them off."
            )

    def _after_library_init(self) -> None:
        self._use_weighted_collator()
        self._install_weighting()

    # ----------------------------------------------------------------------------------------------------------
    # Data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        names = column_names(dataset)
        present = check_weight_columns(names, allowed=_PAIR_WEIGHT_COLUMNS)
        before = len(dataset) if hasattr(dataset, "num_rows") else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)  # drops truncated rows
        if before is not None:
            check_not_truncated_away(before, len(dataset), f"{dataset_name} dataset", args)
        columns = {name: name.replace("_weights", "_ids") for name in present}
        return normalize_weight_columns(
            dataset, columns, _compat.training_tokenizer(self).eos_token_id, args.eos_token_weight
        )

    def _install_weighting(self) -> None:
        """Wrap the fused forwards of policy and (separate) reference so token weights can be applied (idempotent)."""
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        _wrap_fused_forward(policy, self._weighting)
        ref = self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else None
        if ref is not None and not isinstance(ref, DeltasOffReference):
            _wrap_fused_forward(ref, self._weighting)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Precomputed reference sums must be weighted like the policy's: the batches need their token weights.
        self._use_weighted_collator()
        self._install_weighting()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # ----------------------------------------------------------------------------------------------------------
    # Weighted log-probs

    def _weigh_log_probs(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Apply static weights and, in dynamic mode, ALLO's rejected-token selection to per-token log-probs."""
        state = self._weighting
        seq_len = labels.size(1) - 1
        real = log_probs[:, -seq_len:]  # prompt-learning PEFT prepends virtual positions
        completion = (labels[:, 1:] != -100).to(real.dtype)
        weights = state.weights.to(real) if state.weights is not None else completion
        if state.capture:
            state.captured = real.detach()
            return log_probs
        if state.ref_token_logps is not None:
            ref = state.ref_token_logps.to(real)
            half = real.size(0) // 2
            selected = select_lowest_ratio_tokens(
                real[half:].detach(), ref[half:], completion[half:], self.rejected_token_ratio
            )
            weights = torch.cat([weights[:half], weights[half:] * selected], dim=0)
            ref_weights = weights
            multiplier = ld_alpha_multiplier(completion, self.ld_alpha)
            if multiplier is not None:
                ref_weights = ref_weights * multiplier.to(ref_weights)
            ref_sums = (ref * ref_weights).sum(dim=1)
            state.inputs["ref_chosen_logps"], state.inputs["ref_rejected_logps"] = ref_sums.chunk(2, dim=0)
        weighted = real * weights
        if log_probs.size(1) == seq_len:
            return weighted
        return torch.cat([log_probs[:, :-seq_len], weighted], dim=1)

    @contextlib.contextmanager
    def _weights_active(self, weights, ref_token_logps=None, inputs=None):
        state = self._weighting
        state.active, state.weights, state.ref_token_logps, state.inputs = True, weights, ref_token_logps, inputs
        try:
            yield
        finally:
            state.active, state.weights, state.ref_token_logps, state.inputs = False, None, None, None

    def _reference_token_logps(self, inputs: dict) -> torch.Tensor:
        """Per-token reference log-probs (unweighted) from one reference forward, through TRL's own reference call."""
        state = self._weighting
        state.capture = True
        try:
            with self._weights_active(None):
                self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)
            return state.captured
        finally:
            state.capture, state.captured = False, None

    def compute_ref_log_probs(self, model, inputs):
        weights = inputs.pop("token_weights", None) if isinstance(inputs, dict) else None
        if weights is None or self._weighting.active:
            return super().compute_ref_log_probs(model, inputs)
        with self._weights_active(weights):
            return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("token_weights", None)
        if weights is None and self.rejected_token_ratio is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.rejected_token_ratio is None:
            with self._weights_active(weights):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Dynamic selection: one reference forward now; TRL then reads the (selected, weighted) reference sums that
        # the policy forward writes into `inputs`, as if they had been precomputed.
        ref_token_logps = self._reference_token_logps(inputs)
        inputs = dict(inputs)
        half = inputs["input_ids"].size(0) // 2
        placeholder = torch.zeros(half, device=inputs["input_ids"].device)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = placeholder, placeholder
        with _compat.reference_logps_as_precomputed(self), self._weights_active(weights, ref_token_logps, inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
