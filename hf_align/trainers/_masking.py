"""Trainer-side glue for neuron masks, meant to be shared by every trainer that trains only masked neurons.

The mechanism itself (freezing, trainable deltas at the selected rows/entries, the deltas-off reference, merging,
delta checkpoints) lives in :mod:`hf_align.masks` and :mod:`hf_align.sparse_update`. This module only wires it into a
``transformers.Trainer``: config fields, resolving the mask from those fields, attaching deltas before the trainer is
built, and saving / resuming checkpoints that hold deltas.

* :data:`NeuronMaskArguments` -- the mask fields of :class:`~hf_align.trainers.MaskedDPOConfig`, taken from it (same
  names, defaults and help), so a config class gets them by inheriting.
* :class:`NeuronMaskTrainerMixin` -- ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model`` for models with
  deltas; put it before the TRL trainer in the bases.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from hf_align.trainers.masked_dpo import DELTAS_DIR, MaskedDPOConfig
from hf_align.trainers.masked_dpo import _resolve_neuron_mask as resolve_neuron_mask


__all__ = [
    "DELTAS_DIR",
    "MASK_FIELDS",
    "NeuronMaskArguments",
    "NeuronMaskTrainerMixin",
    "attach_mask",
    "resolve_neuron_mask",
    "validate_mask_fields",
]

MASK_FIELDS = (
    "neuron_mask_path",
    "neuron_scores_path",
    "neuron_mask_ratio",
    "neuron_mask_granularity",
    "neuron_mask_scope",
    "neuron_mask_select",
    "neuron_mask_exclude_top",
    "save_merged",
)


def _mask_fields_of(config_class: type) -> list[tuple]:
    hints = typing.get_type_hints(config_class)
    by_name = {f.name: f for f in dataclasses.fields(config_class)}
    return [
        (name, hints[name], dataclasses.field(default=by_name[name].default, metadata=dict(by_name[name].metadata)))
        for name in MASK_FIELDS
    ]


NeuronMaskArguments = dataclasses.make_dataclass("NeuronMaskArguments", _mask_fields_of(MaskedDPOConfig))
NeuronMaskArguments.__module__ = __name__
NeuronMaskArguments.__doc__ = "Neuron-mask fields (same as MaskedDPOConfig's); inherit it before the TRL config."


def validate_mask_fields(args) -> None:
    """The checks ``MaskedDPOConfig.__post_init__`` does on the mask fields, for other configs carrying them."""
    if args.neuron_mask_ratio is not None and not 0.0 < args.neuron_mask_ratio <= 1.0:
        raise ValueError(f"neuron_mask_ratio must be in (0, 1], got {args.neuron_mask_ratio}.")
    if args.neuron_mask_granularity not in ("row", "element"):
        raise ValueError(f"neuron_mask_granularity must be 'row' or 'element', got {args.neuron_mask_granularity!r}.")
    if (args.neuron_scores_path is None) != (args.neuron_mask_ratio is None):
        raise ValueError("neuron_scores_path and neuron_mask_ratio go together: give both or neither.")
    if args.neuron_mask_path is not None and args.neuron_scores_path is not None:
        raise ValueError("Give either neuron_mask_path or neuron_scores_path + neuron_mask_ratio, not both.")


def attach_mask(model, mask, args):
    """Load ``model`` if it is a path, check ``mask`` against it and attach trainable deltas; returns the model."""
    if isinstance(model, str):
        from trl.trainer.utils import create_model_from_path

        init_kwargs = dict(args.model_init_kwargs or {})
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        model = create_model_from_path(model, **init_kwargs)
    from hf_align.sparse_update import attach_deltas

    mask.validate(model)
    attach_deltas(model, mask)
    return model


class NeuronMaskTrainerMixin:
    """Checkpointing for a trainer whose model carries neuron deltas (``self.neuron_mask`` set, or None).

    Final saves are a normal transformers checkpoint with the deltas merged (``save_merged=True``) or only the
    deltas + mask; checkpoints always keep the exact deltas under ``neuron_deltas/`` so resuming continues from the
    frozen base plus deltas.
    """

    neuron_mask = None

    def _trainable_fraction(self) -> float:
        model = self.accelerator.unwrap_model(self.model)
        if self.neuron_mask is not None:
            from hf_align.sparse_update import trainable_fraction

            return float(trainable_fraction(model))
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return trainable / max(total, 1)

    def _has_deltas(self) -> bool:
        if self.neuron_mask is None:
            return False
        from hf_align.sparse_update import has_deltas

        return has_deltas(self.accelerator.unwrap_model(self.model))

    def _save_checkpoint(self, model, trial):
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._has_deltas():
            return super()._save(output_dir, state_dict)
        from hf_align.sparse_update import save_model_with_deltas

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # Checkpoints keep the exact deltas so `resume_from_checkpoint` continues from the frozen base + deltas.
        save_model_with_deltas(
            self.accelerator.unwrap_model(self.model),
            output_dir,
            self.neuron_mask,
            save_merged=self.args.save_merged,
            keep_deltas=getattr(self, "_in_checkpoint", False),
            deltas_dir=DELTAS_DIR,
        )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._has_deltas():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_deltas_dir(resume_from_checkpoint)

    def _load_best_model(self):
        if not self._has_deltas():
            return super()._load_best_model()
        self._load_deltas_dir(self.state.best_model_checkpoint)

    def _load_deltas_dir(self, checkpoint: str) -> None:
        from hf_align.sparse_update import load_deltas

        path = Path(checkpoint) / DELTAS_DIR
        if not path.is_dir():
            path = Path(checkpoint)
        load_deltas(self.accelerator.unwrap_model(self.model), path)
