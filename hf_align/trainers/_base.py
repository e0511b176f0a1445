"""What every hf-align trainer shares, written once: JSON training arguments on every save, collator upgrades,
``trainable_fraction`` logging and the token-weight config field.

Put :class:`HFAlignTrainerMixin` *first* in a trainer's bases (before ``NeuronMaskTrainerMixin`` and the TRL
trainer), so its ``_save`` runs around every other save hook and the JSON arguments are written whatever wrote
the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hf_align.callbacks.json_training_args import replace_training_args_pickle
from hf_align.config_checks import check_config_values


__all__ = [
    "CheckedConfig",
    "HFAlignTrainerMixin",
    "TokenWeightArguments",
    "load_model",
    "resolve_args",
    "upgrade_collator",
]


@dataclass
class CheckedConfig:
    """A base of every hf-align config: every field's type and range is checked (:mod:`hf_align.config_checks`)
    on the values as given, before the TRL/transformers ``__post_init__`` that comes next in the MRO."""

    def __post_init__(self):
        check_config_values(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class TokenWeightArguments(CheckedConfig):
    """The token-weight field shared by every trainer that reads ``*_weights`` columns; inherit it before the TRL
    config (its range, ``>= 0`` and finite, is checked with every other field)."""

    eos_token_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the EOS the trainer appends, when a weights list omits it (n-1 entries)."},
    )


def resolve_args(args, config_class: type, parent_class: type, model, method: str):
    """The trainer's config, as TRL resolves its own: ``None`` → ``config_class("<model name>-<method>")``; an
    instance of the parent TRL config (e.g. ``trl.DPOConfig``) → ``config_class`` with every one of its fields
    copied and hf-align's own fields at their defaults; anything else is refused by name."""
    if args is None:
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_class(f"{name.split('/')[-1]}-{method}")
    if isinstance(args, config_class):
        return args
    if isinstance(args, parent_class):
        return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
    raise TypeError(
        f"args must be a {config_class.__name__} (or a {parent_class.__name__}, upgraded with hf-align's defaults), "
        f"got {type(args).__name__}."
    )


def load_model(model, args, like=None):
    """``model`` itself, or the model at that path / Hub id built as TRL builds a policy from a string: with
    ``args.model_init_kwargs`` and ``args.trust_remote_code`` (``device_map=None`` under distributed training).
    ``like``: a loaded policy whose dtype and attention implementation a reference built here follows, as TRL's
    own reference copy does."""
    if not isinstance(model, str):
        return model
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    if like is not None:
        kwargs.setdefault("dtype", like.dtype)
        kwargs.setdefault("attn_implementation", like.config._attn_implementation)
    return create_model_from_path(model, **kwargs)


def upgrade_collator(collator, base_class: type, new_class: type):
    """``new_class`` built with *every* dataclass field of ``collator`` when it is exactly TRL's ``base_class``;
    any other collator (a user's own) is returned unchanged. Copying all fields keeps options TRL sets that a
    hand-written field list would drop (e.g. ``return_position_ids`` under sequence parallelism)."""
    if type(collator) is not base_class:
        return collator
    values = {f.name: getattr(collator, f.name) for f in dataclasses.fields(collator) if f.init}
    return new_class(**values)


class HFAlignTrainerMixin:
    """Shared behaviour of every ``transformers.Trainer`` subclass in hf-align.

    * every ``_save`` (``save_model``, each checkpoint, the DeepSpeed/FSDP gathered saves) leaves
      ``training_args.json`` and no pickled ``training_args.bin``;
    * ``self.trainable_fraction`` (set by :meth:`_set_trainable_fraction`) is logged with every training loss.
    """

    trainable_fraction: float | None = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            replace_training_args_pickle(output_dir if output_dir is not None else self.args.output_dir, self.args)

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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.trainable_fraction is not None and self.model.training and "loss" in logs:
            logs["trainable_fraction"] = self.trainable_fraction
        super().log(logs, start_time)
