"""The one home of the trainer-side glue for neuron masks, shared by every trainer that trains only masked neurons.

The mechanism itself (freezing, trainable deltas at the selected rows/entries, merging, delta checkpoints) lives in
:mod:`hf_align.masks` and :mod:`hf_align.sparse_update`. This module only wires it into a ``transformers.Trainer``:

* :class:`NeuronMaskArguments` -- the mask config fields; a config gets them by inheriting it before the TRL config
  (its ``__post_init__`` checks them with :func:`validate_mask_fields`);
* :func:`resolve_neuron_mask` -- the ``NeuronMask`` from the trainer argument or those fields;
* :func:`attach_mask` -- load the model if it is a path, attach trainable deltas;
* :class:`DeltasOffReference` -- the policy with its deltas switched off, as a reference model holding no weights;
* :class:`NeuronMaskTrainerMixin` -- the ``__init__`` glue (:meth:`~NeuronMaskTrainerMixin._load_and_mask`,
  :meth:`~NeuronMaskTrainerMixin._init_library_trainer`) and ``_save`` / ``_load_from_checkpoint`` /
  ``_load_best_model`` for models with deltas. It must come before the TRL trainer in the bases (and after
  ``HFAlignTrainerMixin``); a class that breaks the order is refused with ``TypeError`` when it is defined.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from hf_align.config_checks import Range, from_prefixed, option, prefixed_dataclass
from hf_align.errors import UserError
from hf_align.masks import MaskSelection
from hf_align.scores import GRANULARITIES
from hf_align.trainers._base import (
    HFAlignTrainerMixin,
    gguf_stand_ins,
    library_trainer,
    load_policy_and_reference,
    require_before_trainer,
    resolve_args,
)
from hf_align.trainers._data_checks import check_dataset
from hf_align.trainers.registry import spec_for


__all__ = [
    "DELTAS_DIR",
    "DELTA_DTYPES",
    "MASK_FIELDS",
    "DeltasOffReference",
    "NeuronMaskArguments",
    "NeuronMaskTrainerMixin",
    "attach_mask",
    "mask_selection",
    "deltas_reference_unwrapped",
    "resolve_neuron_mask",
    "validate_mask_fields",
]

logger = logging.get_logger(__name__)

DELTAS_DIR = "neuron_deltas"
"""Sub-directory of a checkpoint holding the deltas + mask (what ``resume_from_checkpoint`` reloads)."""

DELTA_DTYPES = ("auto", "float32", "bfloat16", "float16")


MaskSelectionArguments = prefixed_dataclass(
    "MaskSelectionArguments", MaskSelection, "neuron_mask_", __name__, exclude=("seed",)
)  # the training run's `seed` seeds select='random'


@dataclass
class NeuronMaskArguments(MaskSelectionArguments):
    """Neuron-mask fields of every mask trainer's config; inherit it before the TRL config."""

    neuron_mask_path: str | None = option(
        None,
        help="A saved `NeuronMask`: a folder or a Hub repo id (`org/name`, `org/name@revision`, "
        "`org/name/subfolder`); only the selected rows/entries are trained.",
    )
    neuron_scores_path: str | None = option(
        None,
        help="Neuron scores (`hf_align.scores`): a folder or a Hub repo id (as neuron_mask_path); with "
        "`neuron_mask_ratio` selects a mask.",
    )
    neuron_mask_granularity: str = option(
        "row",
        help="Granularity when selecting from full-shape scores: 'row' (one neuron = an output row, cheap) or "
        "'element' (individual parameters, as ALLO). 1-D scores are always rows.",
        choices=GRANULARITIES,
    )
    neuron_delta_dtype: str = option(
        "auto",
        help="dtype of the trainable deltas: 'auto' (the weights' dtype; a 4-bit layer's compute dtype) or "
        "'float32' / 'bfloat16' / 'float16'. 'float32' on a bf16 base keeps small updates bf16 would round away.",
        choices=DELTA_DTYPES,
    )
    neuron_sampled_gradient_density: float = option(
        0.0,
        help="Element masks: a Linear layer whose selected fraction is at most this computes only its selected "
        "entries of the weight gradient (a sampled GEMM) instead of the whole gradient; equal up to float summation "
        "order. It pays on sparse modules only (fp32: up to ~0.1, bf16: ~0.02 on CPU; see "
        "benchmarks/sampled_gradient.py). 0 never samples.",
        range=Range(0, 1),
    )
    save_merged: bool = option(
        True,
        help="Save a normal transformers checkpoint with deltas merged (loadable without hf_align). False saves "
        "only the deltas + mask (small; merge later with `hf_align.sparse_update`).",
    )

    def __post_init__(self):
        super().__post_init__()  # every field's type, choices and range, then the TRL config's own checks
        validate_mask_fields(self)


MASK_FIELDS = tuple(name for name in NeuronMaskArguments.__dataclass_fields__)


def mask_selection(args) -> MaskSelection:
    """The :class:`~hf_align.masks.MaskSelection` of a config's ``neuron_mask_*`` fields (seeded by ``args.seed``)."""
    return from_prefixed(MaskSelection, args, "neuron_mask_", seed=getattr(args, "seed", 0))


def validate_mask_fields(args) -> None:
    """Which mask fields go together (each field's type, choices and range are checked with every other field,
    :class:`~hf_align.config_checks.CheckedConfig`)."""
    ratio = args.neuron_mask_ratio
    if (args.neuron_scores_path is None) != (ratio is None):
        raise ValueError("neuron_scores_path and neuron_mask_ratio go together: give both or neither.")
    if args.neuron_mask_path is not None and args.neuron_scores_path is not None:
        raise ValueError("Give either neuron_mask_path or neuron_scores_path + neuron_mask_ratio, not both.")
    MaskSelection.check_band(ratio, args.neuron_mask_exclude_top, prefix="neuron_mask_")


def resolve_neuron_mask(neuron_mask, args, model=None):
    """A ``NeuronMask`` from the trainer argument or the config fields, or None. ``model`` (when loaded) tells
    which weights have their output features on axis 1 (GPT-2's ``Conv1D``) when element scores become rows.

    A mask that selects no neuron is refused here, at trainer build: it would train nothing and fail in autograd
    (no parameter requires a gradient) after the model is loaded."""
    mask = _resolve_neuron_mask(neuron_mask, args, model)
    if mask is not None and mask.num_selected == 0:
        source = neuron_mask if isinstance(neuron_mask, str | os.PathLike) else None
        source = source or args.neuron_mask_path or ("neuron_mask" if neuron_mask is not None else "the mask")
        raise UserError(
            f"neuron mask {str(source)!r} selects no neuron (every entry is False): there is nothing to train; "
            "select a mask with at least one neuron."
        )
    return mask


def _resolve_neuron_mask(neuron_mask, args, model=None):
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
    from hf_align.masks import neuron_sizes

    sizes = neuron_sizes(model) if isinstance(model, torch.nn.Module) else None
    return NeuronMask.from_scores(scores, mask_selection(args), neuron_sizes=sizes)


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
    sampled = getattr(args, "neuron_sampled_gradient_density", 0.0)
    # validates the mask too
    return attach_deltas(model, mask, None if dtype == "auto" else getattr(torch, dtype), sampled)


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


@contextlib.contextmanager
def init_kwargs_applied(args, loaded_here: bool):
    """``args.model_init_kwargs`` hidden from the TRL trainer's ``__init__`` when the model was loaded here with them:
    TRL, handed an instance, would warn that they "will be ignored". They stay on the saved arguments."""
    saved = args.model_init_kwargs
    if loaded_here:
        args.model_init_kwargs = None
    try:
        yield
    finally:
        args.model_init_kwargs = saved


class NeuronMaskTrainerMixin:
    """A TRL trainer that trains only the neurons of a mask (``self.neuron_mask``, or None: all parameters train).

    ``__init__`` glue, written once for every masked trainer: :meth:`_load_and_mask` (load paths, resolve and attach
    the mask, the deltas-off reference), then :meth:`_init_library_trainer` (the TRL trainer's own ``__init__``).
    Final saves are a normal transformers checkpoint with the deltas merged (``save_merged=True``) or only the
    deltas + mask; checkpoints always keep the exact deltas under ``neuron_deltas/`` so resuming continues from the
    frozen base plus deltas.
    """

    neuron_mask = None
    _deltas_reference: DeltasOffReference | None = None

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *, neuron_mask=None, peft_config=None, **kwargs):  # fmt: skip
        """The whole ``__init__`` of a masked trainer over a TRL trainer that takes TRL's preference signature
        (``DPOTrainer``, ``KTOTrainer``): the config resolved as TRL resolves its own, the dataset columns checked
        against the registry entry, the mask attached, then the TRL trainer's ``__init__``. Subclasses adjust it
        through :meth:`_before_library_init` / :meth:`_after_library_init` (a trainer with another signature, such
        as NPO, writes its own ``__init__`` from :meth:`_load_and_mask` and :meth:`_init_library_trainer`)."""
        spec = spec_for(type(self))
        if spec is None:
            raise TypeError(f"{type(self).__name__} is not in hf_align.trainers.registry.TRAINERS: add its entry.")
        config_class = spec.config_class()
        trl_config = next(k for k in config_class.__mro__ if k.__module__.split(".")[0] == "trl")
        args = resolve_args(args, config_class, trl_config, model, self._name)
        self._before_library_init(args)
        check_dataset(train_dataset, "train_dataset", spec.columns)
        check_dataset(eval_dataset, "eval_dataset", spec.columns)
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
        self._after_library_init()
        fraction = self._set_trainable_fraction()
        logger.warning(f"{type(self).__name__}: trainable fraction of parameters = {fraction:.6f}")

    def _before_library_init(self, args) -> None:
        """Checks and state the TRL ``__init__`` needs (it tokenizes and may precompute reference log-probs)."""

    def _after_library_init(self) -> None:
        """Adjust what the TRL ``__init__`` built (collator, model wrappers)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # this mixin's hooks (_save, _load_from_checkpoint) wrap TRL's; HFAlignTrainerMixin's _save wraps them all
        require_before_trainer(cls, NeuronMaskTrainerMixin)
        if HFAlignTrainerMixin in cls.__mro__:
            require_before_trainer(cls, HFAlignTrainerMixin, NeuronMaskTrainerMixin)

    def _load_and_mask(self, model, ref_model, args, neuron_mask, peft_config, trainer_kwargs: dict, *,
                       deltas_reference: bool = True, second_forward: bool = False):  # fmt: skip
        """``(model, ref_model)`` ready for the TRL trainer: paths loaded (the mask is checked against the policy),
        the mask resolved into ``self.neuron_mask`` and attached as trainable deltas. ``deltas_reference``: the
        trainer takes a ``ref_model``; without one (and without precomputed reference log-probs) the reference is
        the policy with its deltas off. ``second_forward``: see :func:`attach_mask`."""
        if hasattr(self, "_record_save_format"):
            self._record_save_format(model, args)  # before loading: a name is loaded in float32
        wants_mask = neuron_mask is not None or bool(args.neuron_mask_path or args.neuron_scores_path)
        path = isinstance(model, str)
        model, ref_model = load_policy_and_reference(model, ref_model, args, wants_mask, trainer_kwargs)
        self._loaded_here = path and not isinstance(model, str)  # with args.model_init_kwargs, already applied
        if ref_model is not None and ref_model is model:
            raise UserError("`model` and `ref_model` cannot be the same object; omit ref_model or pass a copy.")
        self.neuron_mask = mask = resolve_neuron_mask(neuron_mask, args, model)
        if mask is None:
            return model, ref_model
        model = attach_mask(model, mask, args, peft_config, second_forward=second_forward)
        logger.warning(f"{type(self).__name__}: {mask!r}")  # rows and, once checked on the model, the weights
        if deltas_reference and ref_model is None and not args.precompute_ref_log_probs:
            if args.sync_ref_model:
                raise UserError("sync_ref_model needs a separate ref_model; with a neuron mask pass one explicitly.")
            ref_model = self._deltas_reference = DeltasOffReference(model)
        return model, ref_model

    def _init_library_trainer(self, model, **kwargs) -> None:
        """The TRL trainer's ``__init__`` (the next class after this mixin in the MRO) on the masked model: the
        frozen quantized base allowed to train (only deltas do), the deltas-off reference passed through TRL's
        reference wrapping unchanged, and its forward restored after TRL patched a fused LM head onto it."""
        from hf_align.sparse_update import quantized_training_allowed

        library = super().__init__  # the next class after this mixin: the TRL trainer
        builds_reference = "ref_model" in kwargs and kwargs["ref_model"] is None  # TRL's copy reads the init kwargs
        gguf_stand_ins(model, kwargs, kwargs["args"], builds_reference)  # what TRL would load by a GGUF's name
        builds_reference = "ref_model" in kwargs and kwargs["ref_model"] is None
        trl_module = sys.modules[library_trainer(type(self)).__module__]  # where TRL looks up prepare_deepspeed
        with (
            quantized_training_allowed(model),
            deltas_reference_unwrapped(trl_module),
            init_kwargs_applied(kwargs["args"], getattr(self, "_loaded_here", False) and not builds_reference),
        ):
            library(model, **kwargs)
        from hf_align.callbacks.defaults import add_default_callbacks

        add_default_callbacks(self)  # also for trainers with an __init__ of their own (NPO), which skip the mixin's
        if self._deltas_reference is not None:
            # TRL patched the stand-in with its fused head; the stand-in must call the policy's own (fused) forward.
            self.accelerator.unwrap_model(self.ref_model).__dict__.pop("forward", None)

    def _has_deltas(self) -> bool:
        if self.neuron_mask is None:
            return False
        from hf_align.sparse_update import has_deltas

        return has_deltas(self.accelerator.unwrap_model(self.model))

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
            keep_deltas=getattr(self, "_in_checkpoint", False),  # set by HFAlignTrainerMixin._save_checkpoint
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
