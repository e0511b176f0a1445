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

from hf_align.trainers._mask_checkpoints import DELTAS_DIR, NeuronMaskTrainerMixin, attach_mask
from hf_align.trainers.masked_dpo import MaskedDPOConfig
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

DELTA_DTYPES = ("auto", "float32", "bfloat16", "float16")

MASK_FIELDS = (
    "neuron_mask_path",
    "neuron_scores_path",
    "neuron_mask_ratio",
    "neuron_mask_granularity",
    "neuron_mask_scope",
    "neuron_mask_select",
    "neuron_mask_exclude_top",
    "neuron_delta_dtype",
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
    if args.neuron_delta_dtype not in DELTA_DTYPES:
        raise ValueError(f"neuron_delta_dtype must be one of {DELTA_DTYPES}, got {args.neuron_delta_dtype!r}.")
