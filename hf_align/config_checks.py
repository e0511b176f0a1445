"""Every config field checked when the config is built: its type (from the dataclass annotation), its choices and
its range -- both read from the field's own declaration (``metadata={"help": ..., "choices": (...), "range":
Range(...)}``, see :func:`option`), so an option is declared once and every reader (configs, callbacks, the CLI,
cards, these checks) reads that one declaration.

A recipe is YAML someone may have typed by hand: ``beta: [0.1, 0.2]``, ``beta: true``, ``num_quantiles: 2.7`` or
``categories: good`` reach a dataclass unconverted and fail deep in TRL at step 1 -- or, worse, train (``beta: -0.1``
trains *toward* the rejected answers, ``eos_token_weight: inf`` turns every weight into NaN). Here each is a
one-line error naming the field, the value and what was expected, before any model is loaded.

TRL's and transformers' own fields carry no range; the ones our methods depend on get theirs from
:data:`LIBRARY_RANGES`, one table keyed by the library class that *declares* the field (``trl.DPOConfig``,
``transformers.TrainingArguments``): not by bare field name, so a same-named field of another class is not judged by
a rule written for a different meaning, and without re-declaring TRL's fields (and copying their defaults and help)
in our subclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hf_align.errors import UserError


__all__ = [
    "LIBRARY_RANGES",
    "CheckedConfig",
    "Range",
    "check_config_values",
    "check_option",
    "check_training_length",
    "move_renamed_fields",
    "from_prefixed",
    "option",
    "option_choices",
    "own_fields",
    "prefixed_dataclass",
    "prefixed_fields",
    "prefixed_name",
]


@dataclass(frozen=True)
class Range:
    """``low`` / ``high`` bounds (``None``: unbounded); ``open_low`` / ``open_high`` exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def describe(self) -> str:
        left = "(" if self.open_low else "["
        right = ")" if self.open_high else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"in {left}{low}, {high}{right}"


POSITIVE = Range(0, None, open_low=True)
NON_NEGATIVE = Range(0, None)
FRACTION = Range(0, 1, open_low=True)  # (0, 1]
UNIT = Range(0, 1)  # [0, 1]
BELOW_ONE = Range(0, 1, open_high=True)  # [0, 1)
AT_LEAST_ONE = Range(1, None)

LIBRARY_RANGES: dict[str, dict[str, Range]] = {
    # "<top-level package>.<class>" of the TRL / transformers class that declares the field
    "transformers.TrainingArguments": {
        "learning_rate": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "max_grad_norm": NON_NEGATIVE,
        "num_train_epochs": NON_NEGATIVE,
        "per_device_train_batch_size": AT_LEAST_ONE,
        "per_device_eval_batch_size": AT_LEAST_ONE,
        "gradient_accumulation_steps": AT_LEAST_ONE,
    },
    "trl.DPOConfig": {
        "beta": POSITIVE,
        "label_smoothing": Range(0, 0.5, open_high=True),
        "ld_alpha": UNIT,
        "ref_model_mixup_alpha": UNIT,
        "max_length": AT_LEAST_ONE,
        "precompute_ref_batch_size": AT_LEAST_ONE,
    },
    "trl.KTOConfig": {
        "beta": POSITIVE,
        "desirable_weight": NON_NEGATIVE,
        "undesirable_weight": NON_NEGATIVE,
        "ref_model_mixup_alpha": UNIT,
        "max_length": AT_LEAST_ONE,
        "precompute_ref_batch_size": AT_LEAST_ONE,
    },
    "trl.SFTConfig": {"max_length": AT_LEAST_ONE},
}

_HIDDEN_KEYS = frozenset({"range"})


class _Metadata(dict):
    """A field's metadata whose ``range`` stays out of ``dict(metadata)``: transformers' ``HfArgumentParser`` (and
    so TRL's ``TrlParser``) passes every metadata key to ``argparse.add_argument``, which knows ``help`` and
    ``choices`` but would refuse ``range``. ``metadata["range"]`` / ``.get("range")`` still read it."""

    @classmethod
    def copy_of(cls, metadata) -> _Metadata:
        """A ``_Metadata`` holding every key of ``metadata`` (a plain dict's, or another ``_Metadata``'s hidden ones)."""
        copy = cls()
        dict.update(copy, {key: metadata[key] for key in [*metadata.keys(), *_HIDDEN_KEYS] if key in metadata})
        return copy

    def keys(self):
        return [key for key in super().keys() if key not in _HIDDEN_KEYS]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Iterable[Any] | None = None,
    range: Range | None = None,  # noqa: A002 -- the metadata key's name
    **field_kwargs: Any,
) -> Any:
    """A dataclass field declared once: default, help, and the choices or range every reader checks against."""
    metadata = _Metadata(help=help)
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if range is not None:
        metadata["range"] = range
    return dataclasses.field(default=default, metadata=metadata, **field_kwargs)


def prefixed_fields(
    source: type, prefix: str, *, exclude: Iterable[str] = ()
) -> list[tuple[str, Any, dataclasses.Field]]:
    """``source``'s fields renamed ``<prefix><name>`` (a name already starting with ``prefix`` is kept), same type,
    default, help, choices and range, as ``(name, type, field)`` for :func:`dataclasses.make_dataclass`: a config
    that carries the options of another dataclass (``neuron_mask_ratio`` from ``MaskSelection.ratio``) declares
    nothing twice. Names follow :func:`prefixed_name`."""
    hints = typing.get_type_hints(source)
    skipped = set(exclude)
    fields = []
    for f in dataclasses.fields(source):
        if not f.init or f.name in skipped:
            continue
        metadata = _Metadata.copy_of(f.metadata)
        name = prefixed_name(f.name, prefix)
        copy = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=metadata)
        fields.append((name, hints[f.name], copy))
    return fields


def prefixed_dataclass(
    name: str, source: type, prefix: str, module: str, *, exclude: Iterable[str] = (), doc: str | None = None
) -> type:
    """A :class:`CheckedConfig` dataclass ``name`` holding :func:`prefixed_fields` of ``source``, defined in
    ``module`` (so it counts as hf-align's own: its strings and choices are checked too)."""
    klass = dataclasses.make_dataclass(name, prefixed_fields(source, prefix, exclude=exclude), bases=(CheckedConfig,))
    klass.__module__ = module
    klass.__doc__ = doc or f"{source.__name__}'s fields as ``{prefix}*`` fields (declared there, once)."
    return klass


def from_prefixed(options_class: type, source: Any, prefix: str, **given: Any) -> Any:
    """An ``options_class`` built from ``source``'s :func:`prefixed_fields` (``neuron_mask_ratio`` ->
    ``ratio``); ``given`` sets the fields ``source`` lacks (or overrides them)."""
    for f in dataclasses.fields(options_class):
        name = prefixed_name(f.name, prefix)
        if f.init and f.name not in given and hasattr(source, name):
            given[f.name] = getattr(source, name)
    return options_class(**given)


def prefixed_name(name: str, prefix: str) -> str:
    """``<prefix><name>``, except a name that already reads so (``score_dtype`` under ``score_``, ``select`` under
    ``select_``), which is kept."""
    return name if name.startswith(prefix) or name == prefix.rstrip("_") else f"{prefix}{name}"


def option_choices(owner: type, name: str) -> tuple:
    """The declared choices of ``owner``'s field ``name``."""
    return owner.__dataclass_fields__[name].metadata["choices"]


def check_option(owner: type, name: str, value: Any, label: str | None = None) -> None:
    """Check ``value`` (type, choices, range) against the declaration of ``owner``'s field ``name``: for a function
    argument that is the same option as a config field (``granularity=`` of ``reduce_magnitude`` is
    ``ScoreOptions.granularity``). The one-line error names ``label`` (default ``<owner>.<name>``)."""
    _check_value(label or f"{owner.__name__}.{name}", value, *_declaration(owner, name))


def check_choice(label: str, value: Any, choices: Iterable[Any]) -> None:
    """The choices rule of :func:`option` for choices declared outside a dataclass field (a file header's keys, a
    function argument no config carries): the same one-line :class:`~hf_align.errors.UserError` as a field's."""
    _check_value(label, value, None, True, tuple(choices), None)


@functools.cache
def _declaration(owner: type, name: str) -> tuple[str | None, bool, tuple | None, Range | None]:
    """``(kind, optional, choices, range)`` of a field (cached: some options are checked in a per-step path)."""
    field = owner.__dataclass_fields__[name]
    kind, optional = _kind(typing.get_type_hints(owner)[name])
    return kind, optional, field.metadata.get("choices"), field.metadata.get("range")


_SCALARS = {float: "float", int: "int", bool: "bool", str: "str"}


def _kind(annotation: Any) -> tuple[str | None, bool]:
    """``("float" | "int" | "bool" | "str" | "list[str]" | "list[float]" | None, optional)`` for an annotation;
    ``None`` for anything a plain check cannot judge (unions of several kinds, dicts, enums)."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            return None, optional
        annotation = members[0]
        origin = typing.get_origin(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation], optional
    if origin is list and typing.get_args(annotation) in ((str,), (float,)):
        return f"list[{typing.get_args(annotation)[0].__name__}]", optional
    return None, optional


def _type_error(label: str, value: Any, expected: str) -> UserError:
    return UserError(f"{label} must be {expected}, got {value!r} ({type(value).__name__}).")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(label: str, value: Any, kind: str) -> None:
    if kind == "float" and not (_is_number(value) and math.isfinite(value)):
        raise _type_error(label, value, "a finite number")
    if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _type_error(label, value, "an integer")
    if kind == "bool" and not isinstance(value, bool):
        raise _type_error(label, value, "true or false")
    if kind == "str" and not isinstance(value, str):
        raise _type_error(label, value, "a string")
    if kind.startswith("list["):
        item_ok = (lambda v: isinstance(v, str)) if kind == "list[str]" else _is_number
        if not isinstance(value, list | tuple) or not all(item_ok(v) for v in value):
            expected = "a list of strings" if kind == "list[str]" else "a list of numbers"
            raise _type_error(label, value, expected)


def _check_value(
    label: str, value: Any, kind: str | None, optional: bool, choices: Iterable | None, rule: Range | None
) -> None:
    """One field's value against its type, its choices and its range."""
    if value is None and (optional or kind is None):
        return
    if kind is not None:
        if value is None:
            raise _type_error(label, value, f"a {kind} (it cannot be None)")
        _check_type(label, value, kind)
    if choices is not None and not isinstance(value, list | tuple) and value not in choices:
        raise UserError(f"{label} must be one of {tuple(choices)}, got {value!r}.")
    if rule is not None and _is_number(value) and not rule.holds(value):
        raise UserError(f"{label} must be {rule.describe()}, got {value!r}.")


def _annotations(config_class: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(config_class.__mro__):
        try:
            hints.update(typing.get_type_hints(klass))
        except Exception:  # a base whose annotations do not resolve here: judge the fields we can
            continue
    return hints


def own_fields(config_class: type) -> set[str]:
    """Fields that hf-align's classes declare (TRL's own fields may be normalised later by TRL, e.g. a ``loss_type``
    string into a list, so only their numbers and flags are judged here)."""
    return {
        name
        for klass in config_class.__mro__
        if klass.__module__.startswith("hf_align")
        for name in getattr(klass, "__annotations__", {})
    }


def library_ranges(config_class: type) -> dict[str, Range]:
    """The :data:`LIBRARY_RANGES` that apply to ``config_class``: those of every TRL / transformers class in its MRO
    (the most derived class first, so a TRL config's rule wins over its base's)."""
    ranges: dict[str, Range] = {}
    for klass in config_class.__mro__:
        key = f"{klass.__module__.split('.')[0]}.{klass.__qualname__}"
        for name, rule in LIBRARY_RANGES.get(key, {}).items():
            ranges.setdefault(name, rule)
    return ranges


def check_config_values(config) -> None:
    """Check every field of the dataclass ``config`` that a plain check can judge: the type (numbers and flags of
    every field; strings and lists of hf-align's own), the declared choices and the declared range (or the
    :data:`LIBRARY_RANGES` one of a TRL / transformers field); warn when the run cannot learn
    (``learning_rate == 0``). Raises :class:`~hf_align.errors.UserError` naming the field."""
    hints = _annotations(type(config))
    own = own_fields(type(config))
    ranges = library_ranges(type(config))
    for field in dataclasses.fields(config):
        if not field.init or field.name not in hints:
            continue
        kind, optional = _kind(hints[field.name])
        label, value = f"{type(config).__name__}.{field.name}", getattr(config, field.name)
        rule = field.metadata.get("range") or ranges.get(field.name)  # declared, else LIBRARY_RANGES
        if field.name in own:  # our declaration: every kind and its choices
            _check_value(label, value, kind, optional, field.metadata.get("choices"), rule)
        else:  # TRL's / transformers': numbers and flags (TRL normalises its strings and lists itself later)
            _check_value(label, value, kind if kind in ("float", "int", "bool") else None, optional, None, rule)
    if getattr(config, "learning_rate", None) == 0:
        warnings.warn(f"{type(config).__name__}.learning_rate is 0: training will not change the model.", stacklevel=3)


def check_training_length(config) -> None:
    """How long to train must mean a run: ``max_steps`` 0 or below -1 (TRL trains one step, or a whole epoch), or
    ``num_train_epochs`` ≤ 0 without ``max_steps`` (the untrained model is saved as the result) is one-line
    :class:`~hf_align.errors.UserError` naming the field. Configs without these fields are left alone."""
    name = type(config).__name__
    max_steps, epochs = getattr(config, "max_steps", None), getattr(config, "num_train_epochs", None)
    if _is_number(max_steps) and (max_steps == 0 or max_steps < -1):
        raise UserError(
            f"{name}.max_steps must be a positive number of optimizer steps, or -1 to train num_train_epochs; "
            f"got {max_steps!r}."
        )
    if (max_steps is None or max_steps == -1) and _is_number(epochs) and epochs <= 0:
        raise UserError(
            f"{name}.num_train_epochs must be > 0 when max_steps is not set (-1): {epochs!r} epochs train nothing."
        )


def check_trust(config) -> None:
    """``trust_remote_code`` inside every ``*_init_kwargs`` mapping is ``True`` or ``False``: a trainer given a model
    path hands these to ``from_pretrained``, which reads ``"false"`` as true (:mod:`hf_align.trust`)."""
    from hf_align.trust import FIELD, require_bool

    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        if field.name.endswith("init_kwargs") and isinstance(value, dict) and FIELD in value:
            require_bool(value[FIELD], f"{type(config).__name__}.{field.name}")


@dataclass
class CheckedConfig:
    """A base of every hf-align config and option set: every field's type, choices and range is checked on the
    values as given, before the TRL/transformers ``__post_init__`` that comes next in the MRO."""

    def __init_subclass__(cls, **kwargs):
        """A field declared with a plain ``metadata={"help": ..., "range": ...}`` dict gets the parser-safe mapping
        too (see :class:`_Metadata`), so ``TrlParser`` can parse every config whichever way its fields are written."""
        super().__init_subclass__(**kwargs)
        for value in list(vars(cls).values()):
            if isinstance(value, dataclasses.Field) and "range" in value.metadata:
                value.metadata = types.MappingProxyType(_Metadata.copy_of(value.metadata))

    def __post_init__(self):
        check_training_length(self)
        check_config_values(self)
        check_trust(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


def move_renamed_fields(config, renamed: dict[str, str]) -> None:
    """Each old field that is set moves to its new name with a one-line ``FutureWarning``; both set differently is
    a ``ValueError``. The old field is left ``None``, so saved arguments and recipes hold only the new names."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for old, new in renamed.items():
        value = getattr(config, old)
        if value is None:
            continue
        current = getattr(config, new)
        if current != defaults[new] and current != value:
            raise UserError(f"{type(config).__name__}: {old}={value!r} and {new}={current!r} both set; {old} is the "
                            f"deprecated name of {new}, set only {new}.")  # fmt: skip
        warnings.warn(
            f"{type(config).__name__}: {old} → {new} ({old} is deprecated and goes in the next release).",
            FutureWarning,
            stacklevel=4,
        )
        setattr(config, new, value)
        setattr(config, old, None)
