"""What every hf-align trainer shares, written once: JSON training arguments on every save, collator upgrades,
``trainable_fraction`` logging and the token-weight config field.

:class:`HFAlignTrainerMixin` must come *first* in a trainer's bases (before ``NeuronMaskTrainerMixin`` and the TRL
trainer), so its ``_save`` runs around every other save hook and the JSON arguments are written whatever wrote
the weights; defining a class that breaks this order raises ``TypeError`` (:func:`require_before_trainer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hf_align import _compat
from hf_align.callbacks.json_training_args import replace_training_args_pickle
from hf_align.config_checks import NON_NEGATIVE, CheckedConfig, option


__all__ = [
    "CheckedConfig",
    "HFAlignTrainerMixin",
    "PlotArguments",
    "TokenWeightArguments",
    "global_token_count",
    "gguf_stand_ins",
    "library_trainer",
    "load_model",
    "prepare_reference",
    "require_before_trainer",
    "resolve_args",
    "upgrade_collator",
]


@dataclass
class TokenWeightArguments(CheckedConfig):
    """The token-weight field shared by every trainer that reads ``*_weights`` columns; inherit it before the TRL
    config (its range, ``>= 0`` and finite, is checked with every other field)."""

    eos_token_weight: float = option(
        1.0,
        help="Weight of the EOS the trainer appends, when a weights list omits it (n-1 entries).",
        range=NON_NEGATIVE,
    )


@dataclass
class PlotArguments(CheckedConfig):
    """The ``plots`` switch of every hf-align trainer config (inherit it before the TRL config)."""

    plots: bool = option(
        True,
        help="Write PNG plots into output_dir (mask per layer × module at train begin; reward/KL, NPO's "
        "forget/retain, Quark's pool per quantile, learned α's at train end) and log them to TensorBoard/W&B "
        "when report_to has them. Needs matplotlib (pip install 'hf-align[plots]'); skipped without it.",
    )


def resolve_args(args, config_class: type, parent_class: type, model, method: str, *, training_arguments=False):
    """The trainer's config, as TRL resolves its own: ``None`` → ``config_class("<model name>-<method>")``; an
    instance of the parent TRL config (e.g. ``trl.DPOConfig``) → ``config_class`` with every one of its fields
    copied and hf-align's own fields at their defaults; with ``training_arguments`` (where the TRL parent trainer
    takes them: ``SFTTrainer``), a plain ``transformers.TrainingArguments`` upgraded as TRL upgrades it (its
    ``to_dict()`` plus the hidden ``hub_token``); anything else is refused by name."""
    if args is None:
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_class(f"{name.split('/')[-1]}-{method}")
    if isinstance(args, config_class):
        return args
    if isinstance(args, parent_class):
        return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
    from transformers import TrainingArguments

    if training_arguments and type(args) is TrainingArguments:
        return config_class(**{**args.to_dict(), "hub_token": args.hub_token})  # to_dict hides the hub_token
    raise TypeError(
        f"args must be a {config_class.__name__} (or a {parent_class.__name__}, upgraded with hf-align's defaults), "
        f"got {type(args).__name__}."
    )


def load_model(model, args, like=None, quantization_config=None):
    """``model`` itself, or the model at that path / Hub id built as TRL builds a policy from a string: with
    ``args.model_init_kwargs``, the trainer's ``quantization_config`` and ``args.trust_remote_code``
    (``device_map=None`` under distributed training). ``like``: a loaded policy whose dtype and attention
    implementation a reference built here follows, as TRL's own reference copy does."""
    if not isinstance(model, str):
        return model
    from trl.trainer.utils import create_model_from_path

    from hf_align.gguf import gguf_file_of

    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                "quantization_config is set both as a trainer argument and in args.model_init_kwargs: set it once."
            )
        kwargs["quantization_config"] = quantization_config
    trusted_kwargs(kwargs, args, model)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    if like is not None:
        kwargs.setdefault("dtype", like.dtype)
        kwargs.setdefault("attn_implementation", _compat.attn_implementation(like.config))
    if gguf_file_of(model, kwargs.get("gguf_file")) is not None:  # TRL's loader knows no GGUF: ours dequantizes it
        from hf_align.loading import load_model as load_by_name

        return load_by_name(model, **kwargs)
    return create_model_from_path(model, **kwargs)


def trusted_kwargs(kwargs: dict, args, model: str) -> dict:
    """``kwargs`` (a copy of ``args.model_init_kwargs``) with ``trust_remote_code`` set from the config and checked
    to be ``True``/``False``: ``from_pretrained`` would read ``"false"`` as true (:mod:`hf_align.trust`)."""
    from hf_align.trust import require_bool

    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    require_bool(kwargs["trust_remote_code"], f"loading {model!r} (model_init_kwargs / trust_remote_code)")
    return kwargs


def load_policy_and_reference(model, ref_model, args, load_policy: bool, trainer_kwargs: dict):
    """``(model, ref_model)`` with paths loaded as TRL loads them: the policy when ``load_policy`` (a mask is checked
    against it) or when the reference is a path (TRL takes a path for the policy only; a reference path is built
    alike, following the policy's dtype and attention, quantized alike). ``trainer_kwargs``: the trainer's other
    keyword arguments; their ``quantization_config`` is applied here when the policy is loaded here (and taken out),
    else left for TRL, which loads the policy path."""
    from hf_align.gguf import gguf_file_of
    from hf_align.loading import check_gguf_inputs

    check_gguf_inputs(*(m for m in (model, ref_model) if isinstance(m, str)))  # a bad file before any load
    quantization = trainer_kwargs.get("quantization_config")
    gguf_policy = isinstance(model, str) and gguf_file_of(model) is not None  # TRL's loader knows no GGUF
    if isinstance(model, str) and (load_policy or gguf_policy or isinstance(ref_model, str)):
        model = load_model(model, args, quantization_config=trainer_kwargs.pop("quantization_config", None))
    if isinstance(ref_model, str):
        ref_model = load_model(ref_model, args, like=model, quantization_config=quantization)
    return model, ref_model


def gguf_stand_ins(model, trainer_kwargs: dict, config, builds_reference: bool) -> None:
    """For a policy loaded from a ``.gguf`` file (``config._name_or_path`` names it: :mod:`hf_align.loading`), what
    TRL would load by that name and cannot (it knows no GGUF), put into ``trainer_kwargs``: the tokenizer, and the
    reference copy a DPO-style trainer builds (``builds_reference``) unless PEFT (the adapter off is the reference)
    or precomputed log-probs make it unneeded."""
    from accelerate.utils import is_peft_model

    from hf_align.gguf import gguf_file_of

    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or gguf_file_of(source) is None:
        return
    if trainer_kwargs.get("processing_class") is None:
        from hf_align.loading import load_tokenizer

        trainer_kwargs["processing_class"] = load_tokenizer(source)
    peft = is_peft_model(model) or trainer_kwargs.get("peft_config") is not None
    if builds_reference and not peft and not getattr(config, "precompute_ref_log_probs", False):
        trainer_kwargs["ref_model"] = load_model(source, config, like=model)


def global_token_count(trainer, selected):
    """What one process divides its summed per-token loss by, so that the engines' average over processes is the
    mean over the tokens of *every* process: the one-process mean at the same global batch. That is the global
    count of nonzero entries of ``selected`` / the number of processes (``average_tokens_across_devices``, as
    transformers does for its own losses), a tensor (no host synchronisation). None with one process or with that
    option off: the loss then divides by its own local count."""
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1 or not getattr(trainer.args, "average_tokens_across_devices", False):
        return None
    count = (selected != 0).sum().reshape(1).float()
    return accelerator.gather(count).sum().clamp(min=1) / accelerator.num_processes


def prepare_reference(trainer, ref_model):
    """A frozen reference placed (and sharded) for inference as TRL's trainers place theirs: a DeepSpeed inference
    engine (ZeRO-3: partitioned, gathered around each forward), FSDP, or accelerate's evaluation-mode placement."""
    from trl.models import prepare_deepspeed, prepare_fsdp

    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(ref_model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(ref_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)


def upgrade_collator(collator, base_class: type, new_class: type):
    """``new_class`` built with *every* dataclass field of ``collator`` when it is exactly TRL's ``base_class``;
    any other collator (a user's own) is returned unchanged. Copying all fields keeps options TRL sets that a
    hand-written field list would drop (e.g. ``return_position_ids`` under sequence parallelism)."""
    if type(collator) is not base_class:
        return collator
    values = {f.name: getattr(collator, f.name) for f in dataclasses.fields(collator) if f.init}
    return new_class(**values)


def library_trainer(cls: type) -> type | None:
    """The first class in ``cls``'s MRO that is a ``transformers.Trainer`` defined by transformers or TRL (the
    library trainer hf-align's mixins extend), or None."""
    from transformers import Trainer

    libraries = ("transformers", "trl")
    return next((k for k in cls.__mro__ if issubclass(k, Trainer) and k.__module__.split(".")[0] in libraries), None)


def require_before_trainer(cls: type, mixin: type, *before: type) -> None:
    """Raise ``TypeError`` unless ``mixin`` precedes, in ``cls``'s MRO, the library trainer
    (:func:`library_trainer`) and every class of ``before``: a mixin's hooks must wrap the library's, which they
    can only do from in front of it in the MRO."""
    mro = cls.__mro__
    library = library_trainer(cls)
    if library is None:
        return
    late = [k for k in (library, *before) if k in mro and mro.index(k) < mro.index(mixin)]
    if late:
        names = ", ".join(k.__name__ for k in late)
        raise TypeError(f"{cls.__name__}: put {mixin.__name__} before {names} in its bases (the MRO order matters).")


class HFAlignTrainerMixin:
    """Shared behaviour of every ``transformers.Trainer`` subclass in hf-align.

    * ``train(resume_from_checkpoint=True)`` resumes from the last complete checkpoint (:mod:`hf_align.checkpoints`);
    * every ``_save`` (``save_model``, each checkpoint, the DeepSpeed/FSDP gathered saves) leaves
      ``training_args.json`` and no pickled ``training_args.bin``;
    * ``self.trainable_fraction`` (set by :meth:`_set_trainable_fraction`) is logged with every training loss;
    * token-weight glue: ``extra_signature_columns`` survive ``remove_unused_columns``, and ``weighted_collator``
      = ``(TRL's collator, ours)`` upgrades TRL's default collator (:meth:`_use_weighted_collator`);
    * the card's tags and paper come from the trainer registry (:mod:`hf_align.trainers.registry`).
    * :class:`~hf_align.callbacks.NoOpWarningCallback` is always added, and
      :class:`~hf_align.callbacks.TrainingPlotsCallback` unless ``args.plots`` is False or matplotlib is missing.
    """

    trainable_fraction: float | None = None
    save_format = None
    """The :class:`hf_align.saving.SaveFormat` every save writes (the base model's dtype and config)."""
    final_save_weights: bool = True
    """False: ``save_model`` writes no weights (the run's product is something else, e.g. warm-up scores);
    checkpoints still hold them, for resuming."""
    extra_signature_columns: tuple[str, ...] = ()
    weighted_collator: tuple[type, type] | None = None
    gguf_by_name: bool = False
    """True where the TRL trainer behind loads a model given by name (no hf-align loader in between): a ``.gguf``
    name is loaded here first, with its tokenizer and the reference TRL would build by that name."""

    def _load_gguf_policy(self, model, config, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with a ``.gguf`` policy or ``ref_model`` given by name loaded here (TRL's loader knows
        no GGUF; both headers checked first) and :func:`gguf_stand_ins` filled in; other models unchanged."""
        import inspect

        from hf_align.loading import check_gguf_inputs

        takes_reference = "ref_model" in inspect.signature(library_trainer(type(self)).__init__).parameters
        reference = kwargs.get("ref_model") if takes_reference and len(args) < 2 else None
        policy_file, reference_file = check_gguf_inputs(
            *(m if isinstance(m, str) else None for m in (model, reference))
        )
        if policy_file is not None:
            model = load_model(model, config, quantization_config=kwargs.pop("quantization_config", None))
            if args:
                args = (model, *args[1:])
            else:
                kwargs = {**kwargs, "model": model}
            builds_reference = takes_reference and len(args) < 2 and kwargs.get("ref_model") is None
            gguf_stand_ins(model, kwargs, config, builds_reference)
        if reference_file is not None:
            kwargs["ref_model"] = load_model(reference, config, like=None if isinstance(model, str) else model)
        return args, kwargs
        check_gguf_inputs(model, *(r for r in [kwargs.get("ref_model")] if isinstance(r, str)))
        loaded = load_model(model, config, quantization_config=kwargs.pop("quantization_config", None))
        kwargs = {**kwargs, "args": config}
        args = (loaded, *args[1:]) if args else args
        if not args:
            kwargs["model"] = loaded
        gguf_stand_ins(loaded, kwargs)
        return args, kwargs

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        require_before_trainer(cls, HFAlignTrainerMixin)
        from hf_align.trainers.registry import TRAINERS

        spec = next((s for s in TRAINERS.values() if s.trainer == f"{cls.__module__}:{cls.__qualname__}"), None)
        if spec is not None:  # a registered class: TRL's tag/paper attributes are the registry's
            cls._tag_names, cls._paper = list(spec.tags), spec.paper_dict

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        _compat.add_signature_columns(self, self.extra_signature_columns)

    def _use_weighted_collator(self) -> None:
        """Swap TRL's default collator for the one that also carries token weights (a user's collator is kept)."""
        if self.weighted_collator is not None:
            self.data_collator = upgrade_collator(self.data_collator, *self.weighted_collator)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``resume_from_checkpoint=True`` takes the last *complete* checkpoint (transformers' own pick,
        ``get_last_checkpoint``, takes the highest number even when a kill interrupted its save); an explicit path
        must be complete (:mod:`hf_align.checkpoints`)."""
        from hf_align.checkpoints import resolve_resume_checkpoint

        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        from transformers import TrainingArguments

        model = args[0] if args else kwargs.get("model")
        config = kwargs.get("args") or next((a for a in args if isinstance(a, TrainingArguments)), None)
        self._record_save_format(model, config)
        if self.gguf_by_name and config is not None:
            args, kwargs = self._load_gguf_policy(model, config, args, kwargs)
        super().__init__(*args, **kwargs)
        from hf_align.callbacks.defaults import add_default_callbacks

        add_default_callbacks(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A save outside checkpoints is all or nothing (:func:`hf_align.saving.all_or_nothing`): written into a
        temporary folder inside ``output_dir``, then moved in; a failure (disk full, permissions) leaves the previous
        contents as they were and says in one line what failed and how much space the save needs. Pushes as the
        Trainer does (``push_to_hub`` and not ``_internal_call``)."""
        if getattr(self, "_in_checkpoint", False):  # a fresh checkpoint-N folder: nothing to keep
            return super().save_model(output_dir, _internal_call)
        from hf_align.saving import all_or_nothing, estimated_save_bytes

        folder = output_dir if output_dir is not None else self.args.output_dir
        dtype = self.save_format.dtype if self.save_format is not None else None
        model = self.accelerator.unwrap_model(self.model)
        needed = estimated_save_bytes(model, dtype) if self.final_save_weights else 0
        with all_or_nothing(folder, needed, main_process=self.args.should_save) as tmp:
            self.accelerator.wait_for_everyone()  # the main process made the folder
            super().save_model(str(tmp), _internal_call=True)
            self.accelerator.wait_for_everyone()
        if self.args.should_save:  # again, in place: the card links files beside it (plots)
            self._write_card(folder)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _record_save_format(self, model, args) -> None:
        """The base's format, before TRL loads it (float32 by default) and the Trainer changes its config; called by
        ``__init__`` and by the trainers with an ``__init__`` of their own (through ``_load_and_mask``)."""
        from hf_align.saving import save_format_of

        if self.save_format is None and model is not None:
            self.save_format = save_format_of(model, getattr(args, "model_init_kwargs", None))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Every save in the base model's format (:mod:`hf_align.saving`): its dtype (unless the user asked for
        another) and config; full-weight checkpoints keep the training dtype, which resuming reads back."""
        from hf_align.saving import restore_saved_config, saving_as

        folder = output_dir if output_dir is not None else self.args.output_dir
        fmt = self.save_format
        resumed_from = getattr(self, "_in_checkpoint", False) and not (
            hasattr(self, "_has_deltas") and self._has_deltas()
        )
        if fmt is not None and resumed_from:  # a checkpoint's weights (not deltas) are what a resume reads back
            fmt = dataclasses.replace(fmt, dtype=None)
        if getattr(self, "_in_checkpoint", False) or self.final_save_weights:
            with saving_as(self.accelerator.unwrap_model(self.model), fmt):
                super()._save(output_dir, state_dict)
        else:
            Path(folder).mkdir(parents=True, exist_ok=True)
        if self.args.should_save:
            if fmt is not None:
                restore_saved_config(folder, fmt)
            replace_training_args_pickle(folder, self.args)
            self._write_card(folder)

    def _save_checkpoint(self, model, trial):
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _set_trainable_fraction(self) -> float:
        """Trainable parameters over all parameters of the unwrapped model (deltas count as their entries)."""
        from hf_align.sparse_update import has_deltas, trainable_fraction

        model = self.accelerator.unwrap_model(self.model)
        if has_deltas(model):
            fraction = float(trainable_fraction(model))
        else:
            total = sum(p.numel() for p in model.parameters())
            fraction = sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
        self.trainable_fraction = fraction
        return fraction

    # ---- model cards: written with every saved artifact, and by TRL's push_to_hub ---------------------------

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **_):
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir, model_name, dataset_name, tags)

    def _write_card(self, folder, model_name=None, dataset_name=None, tags=None) -> None:
        from hf_align.trainers.cards import write_card_for

        write_card_for(self, folder, model_name=model_name, dataset_name=dataset_name, tags=tags)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.trainable_fraction is not None and self.model.training and "loss" in logs:
            logs["trainable_fraction"] = self.trainable_fraction
        super().log(logs, start_time)
