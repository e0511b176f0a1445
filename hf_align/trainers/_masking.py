"""The one home of the trainer-side glue for neuron masks, shared by every trainer that trains only masked neurons.

The mechanism itself (freezing, trainable deltas at the selected rows/entries, merging, delta checkpoints) lives in
:mod:`hf_align.masks` and :mod:`hf_align.sparse_update`. This module only wires it into a ``transformers.Trainer``:

* :class:`NeuronMaskArguments` -- the mask config fields; a config gets them by inheriting it before the TRL config
  (its ``__post_init__`` checks them with :func:`validate_mask_fields`);
* :func:`resolve_neuron_mask` -- the ``NeuronMask`` from the trainer argument or those fields;
* :func:`attach_mask` -- load the model if it is a path, attach trainable deltas;
* :class:`DeltasOffReference` -- the policy with its deltas switched off, as a reference model holding no weights;
* :class:`NeuronMaskTrainerMixin` -- ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model`` for models with
  deltas; put it before the TRL trainer in the bases.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_align.masks import GRANULARITIES, SCOPES, SELECTS
from hf_align.trainers._base import CheckedConfig


__all__ = [
    "DELTAS_DIR",
    "DELTA_DTYPES",
    "MASK_FIELDS",
    "DeltasOffReference",
    "NeuronMaskArguments",
    "NeuronMaskTrainerMixin",
    "attach_mask",
    "deltas_reference_unwrapped",
    "resolve_neuron_mask",
    "validate_mask_fields",
]

DELTAS_DIR = "neuron_deltas"
"""Sub-directory of a checkpoint holding the deltas + mask (what ``resume_from_checkpoint`` reloads)."""

DELTA_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class NeuronMaskArguments(CheckedConfig):
    """Neuron-mask fields of every mask trainer's config; inherit it before the TRL config."""

    neuron_mask_path: str | None = field(
        default=None,
        metadata={"help": "Directory of a saved `NeuronMask`; only the selected rows/entries are trained."},
    )
    neuron_scores_path: str | None = field(
        default=None,
        metadata={"help": "Directory of neuron scores (`hf_align.scores`); with `neuron_mask_ratio` selects a mask."},
    )
    neuron_mask_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of scored rows/entries to train when selecting from `neuron_scores_path`."},
    )
    neuron_mask_granularity: str = field(
        default="row",
        metadata={
            "help": "Granularity when selecting from full-shape scores: 'row' (one neuron = an output row, cheap) "
            "or 'element' (individual parameters, as ALLO). 1-D scores are always rows."
        },
    )
    neuron_mask_scope: str = field(
        default="global",
        metadata={"help": "Selection threshold over all parameters ('global', as ALLO) or per tensor ('tensor')."},
    )
    neuron_mask_select: str = field(
        default="top",
        metadata={"help": "Which scores to keep: 'top' (ALLO), or 'bottom' / 'random' for ablations."},
    )
    neuron_mask_exclude_top: float = field(
        default=0.0,
        metadata={"help": "Exclude the very top fraction of scores (ALLO's band `l`); 0 keeps them."},
    )
    neuron_delta_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the trainable deltas: 'auto' (the weights' dtype; a 4-bit layer's compute dtype) or "
            "'float32' / 'bfloat16' / 'float16'. 'float32' on a bf16 base keeps small updates bf16 would round away."
        },
    )
    save_merged: bool = field(
        default=True,
        metadata={
            "help": "Save a normal transformers checkpoint with deltas merged (loadable without hf_align). False "
            "saves only the deltas + mask (small; merge later with `hf_align.sparse_update`)."
        },
    )

    def __post_init__(self):
        super().__post_init__()  # every field's type and range, then the TRL config's own checks
        validate_mask_fields(self)


MASK_FIELDS = tuple(name for name in NeuronMaskArguments.__dataclass_fields__)


def _check_choice(args, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(args, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def validate_mask_fields(args) -> None:
    """Check the mask fields' choices against the value lists of :mod:`hf_align.masks`, and which go together
    (types and ranges are checked with every other field, :class:`~hf_align.trainers._base.CheckedConfig`)."""
    ratio = args.neuron_mask_ratio
    _check_choice(args, "neuron_mask_granularity", GRANULARITIES)
    _check_choice(args, "neuron_mask_scope", SCOPES)
    _check_choice(args, "neuron_mask_select", SELECTS)
    _check_choice(args, "neuron_delta_dtype", DELTA_DTYPES)
    if (args.neuron_scores_path is None) != (ratio is None):
        raise ValueError("neuron_scores_path and neuron_mask_ratio go together: give both or neither.")
    if args.neuron_mask_path is not None and args.neuron_scores_path is not None:
        raise ValueError("Give either neuron_mask_path or neuron_scores_path + neuron_mask_ratio, not both.")


def resolve_neuron_mask(neuron_mask, args, model=None):
    """A ``NeuronMask`` from the trainer argument or the config fields, or None. ``model`` (when loaded) tells
    which weights have their output features on axis 1 (GPT-2's ``Conv1D``) when element scores become rows."""
    if neuron_mask is None and not args.neuron_mask_path and not args.neuron_scores_path:
        return None
    from hf_align.masks import NeuronMask

    if neuron_mask is not None and (args.neuron_mask_path or args.neuron_scores_path):
        raise ValueError("Pass `neuron_mask` or set neuron_mask_path / neuron_scores_path in the config, not both.")
    if isinstance(neuron_mask, NeuronMask):
        return neuron_mask
    if isinstance(neuron_mask, str | os.PathLike):
        return NeuronMask.load(neuron_mask)
    if neuron_mask is not None:
        raise TypeError(
            f"neuron_mask must be a NeuronMask, a directory path or None, got {type(neuron_mask).__name__}."
        )
    if args.neuron_mask_path:
        return NeuronMask.load(args.neuron_mask_path)
    from hf_align.architectures import neuron_axes, neuron_axis
    from hf_align.scores import load_scores, reduce_magnitude

    scores, _ = load_scores(args.neuron_scores_path)
    if args.neuron_mask_granularity == "row":
        axes = neuron_axes(model) if isinstance(model, torch.nn.Module) else {}
        scores = {
            name: (reduce_magnitude(s, "row", axis=neuron_axis(axes, name)) if s.dim() == 2 else s)
            for name, s in scores.items()
            if s.dim() in (1, 2)
        }
    return NeuronMask.from_scores(
        scores,
        args.neuron_mask_ratio,
        scope=args.neuron_mask_scope,
        select=args.neuron_mask_select,
        exclude_top=args.neuron_mask_exclude_top,
        seed=args.seed,
    )


def attach_mask(model, mask, args, peft_config=None, second_forward: bool = False):
    """Attach trainable deltas at the neurons of ``mask`` (which is checked against ``model``); returns the model.
    A path is loaded before (``_base.load_policy_and_reference``: the mask needs the model). Masks and PEFT adapters
    exclude each other. ``second_forward``: the trainer runs the policy twice with gradients per step (NPO's retain
    term), which DeepSpeed ZeRO-3 cannot reduce for the masked layers (refused)."""
    from accelerate.utils import is_peft_model
    from transformers.integrations import is_deepspeed_zero3_enabled

    from hf_align.sparse_update import attach_deltas

    if peft_config is not None or is_peft_model(model):
        raise ValueError("A neuron mask and a PEFT adapter cannot be combined: train one or the other.")
    if second_forward and is_deepspeed_zero3_enabled():
        # the masked layers are ZeRO-3 leaf modules, whose gradients DeepSpeed reduces in a backward hook that
        # fires once per forward: a second forward with gradients reduces them twice (AssertionError in stage3.py)
        raise ValueError(
            "DeepSpeed ZeRO-3 cannot train a neuron mask with a retain set (two forward passes with gradients per "
            "step; ZeRO-3 reduces a masked layer's gradients once per forward). Use ZeRO-2 or FSDP2, or drop the "
            "retain set."
        )
    _refuse_zero3_output_embeddings(model, mask)
    dtype = getattr(args, "neuron_delta_dtype", "auto")
    return attach_deltas(model, mask, None if dtype == "auto" else getattr(torch, dtype))  # validates the mask too


def _refuse_zero3_output_embeddings(model, mask) -> None:
    """ZeRO-3 + a mask on the output embeddings: refused, naming the alternatives.

    TRL's fused LM head reads ``lm_head.weight`` directly (not through ``lm_head``'s forward) and gathers it with
    ``maybe_gather_lm_head_ctx``, which only handles a ZeRO-3 *parameter*; a delta makes ``weight`` a computed
    tensor, and the step fails deep inside TRL (``'Tensor' object has no attribute 'ds_status'``).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not is_deepspeed_zero3_enabled():
        return
    names = {name for name, param in model.named_parameters() if any(param is p for p in head.parameters())}
    covered = sorted(name for name in names if name in mask.masks and bool(mask.masks[name].any()))
    if covered:
        raise ValueError(
            f"DeepSpeed ZeRO-3 cannot train neuron deltas on the output embeddings ({covered[0]!r}): TRL's fused LM "
            "head reads that weight outside the module's forward, where ZeRO-3 gathers only plain parameters. Leave "
            "it out of the mask (a target on the decoder layers, e.g. hf_align.architectures.ROW_TARGET, the default "
            "for row masks), or train with DeepSpeed ZeRO-2 or FSDP2."
        )


class DeltasOffReference(torch.nn.Module):
    """The policy with its deltas switched off, callable like TRL's reference model; holds no parameters."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_policy", policy)  # not a sub-module: nothing is copied, moved or hashed twice
        self.config = policy.config

    def forward(self, *args, **kwargs):
        from hf_align.sparse_update import deltas_disabled

        with deltas_disabled(self._policy):
            return self._policy(*args, **kwargs)


@contextlib.contextmanager
def deltas_reference_unwrapped(*modules) -> Iterator[None]:
    """Let TRL's trainer init pass a :class:`DeltasOffReference` through its reference wrapping unchanged.

    TRL wraps a separate reference in its own engine (``prepare_deepspeed`` / ``prepare_fsdp``). The stand-in holds
    no parameters -- it calls the policy, which its engine already wraps (ZeRO-3 and FSDP2 gather around each
    module's forward) -- and DeepSpeed cannot build an engine for a module without parameters (ZeRO-3:
    ``IndexError`` in ``DeepSpeedZeRoOffload``). ``modules``: where the trainer looks those functions up.
    """
    from hf_align._compat import reference_preparation_skipped

    with reference_preparation_skipped(lambda model: isinstance(model, DeltasOffReference), *modules):
        yield


def _is_sharded(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))


class NeuronMaskTrainerMixin:
    """Checkpointing for a trainer whose model carries neuron deltas (``self.neuron_mask`` set, or None).

    Final saves are a normal transformers checkpoint with the deltas merged (``save_merged=True``) or only the
    deltas + mask; checkpoints always keep the exact deltas under ``neuron_deltas/`` so resuming continues from the
    frozen base plus deltas.
    """

    neuron_mask = None

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
        if state_dict is not None and not state_dict and _is_sharded(self):
            raise ValueError(
                "DeepSpeed ZeRO-3 did not gather the weights for saving (stage3_gather_16bit_weights_on_model_save is "
                "off), so hf-align cannot write the merged or delta checkpoint. Set `zero3_save_16bit_model: true` "
                "in the accelerate config (or `stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed "
                "config)."
            )
        # Under ZeRO-3 / FSDP2 the live parameters are slices: the Trainer hands over the full state dict it
        # gathered, and the merged / delta files are built from that (ZeRO-2 gathers too; DDP / one process: None).
        # Checkpoints keep the exact deltas so `resume_from_checkpoint` continues from the frozen base + deltas.
        save_model_with_deltas(
            self.accelerator.unwrap_model(self.model),
            output_dir,
            self.neuron_mask,
            save_merged=self.args.save_merged,
            keep_deltas=getattr(self, "_in_checkpoint", False),
            deltas_dir=DELTAS_DIR,
            state_dict=state_dict or None,
        )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Sharded engines resume from their own (sharded) model checkpoint, which holds the deltas as parameters:
        # DeepSpeed loads it itself (this hook is not called), FSDP through the Trainer's `load_fsdp_model`.
        if not self._has_deltas() or _is_sharded(self):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_deltas_dir(resume_from_checkpoint)

    def _load_best_model(self):
        if not self._has_deltas() or _is_sharded(self):  # as in _load_from_checkpoint (not tested sharded)
            return super()._load_best_model()
        self._load_deltas_dir(self.state.best_model_checkpoint)

    def _load_deltas_dir(self, checkpoint: str) -> None:
        from hf_align.sparse_update import load_deltas

        path = Path(checkpoint) / DELTAS_DIR
        if not path.is_dir():
            path = Path(checkpoint)
        load_deltas(self.accelerator.unwrap_model(self.model), path)
