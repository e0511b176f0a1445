"""Every config field checked when the config is built: its type (from the dataclass annotation) and its range
(one table, by field name, shared by every hf-align config and the TRL fields our methods depend on).

A recipe is YAML someone may have typed by hand: ``beta: [0.1, 0.2]``, ``beta: true``, ``num_quantiles: 2.7`` or
``categories: good`` reach a dataclass unconverted and fail deep in TRL at step 1 -- or, worse, train (``beta: -0.1``
trains *toward* the rejected answers, ``eos_token_weight: inf`` turns every weight into NaN). Here each is a
one-line error naming the field, the value and what was expected, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any


__all__ = ["RANGES", "Range", "check_config_values", "own_fields"]


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
AT_LEAST_ONE = Range(1, None)

RANGES: dict[str, Range] = {
    # preference / unlearning losses
    "beta": POSITIVE,
    "label_smoothing": Range(0, 0.5, open_high=True),
    "ld_alpha": UNIT,
    "ref_model_mixup_alpha": UNIT,
    "rejected_token_ratio": FRACTION,
    "eos_token_weight": NON_NEGATIVE,
    "retain_weight": NON_NEGATIVE,
    "retain_batch_size": AT_LEAST_ONE,
    "kl_coef": NON_NEGATIVE,
    "entropy_coef": NON_NEGATIVE,
    # masks
    "neuron_mask_ratio": FRACTION,
    "neuron_mask_exclude_top": Range(0, 1, open_high=True),
    # sampling
    "temperature": POSITIVE,
    "top_p": FRACTION,
    "top_k": NON_NEGATIVE,
    "min_p": UNIT,
    "repetition_penalty": POSITIVE,
    "max_new_tokens": AT_LEAST_ONE,
    "num_generations": AT_LEAST_ONE,
    "generation_batch_size": AT_LEAST_ONE,
    # feedback pool
    "num_quantiles": AT_LEAST_ONE,
    "num_rounds": AT_LEAST_ONE,
    "prompts_per_round": AT_LEAST_ONE,
    "steps_per_round": AT_LEAST_ONE,
    "num_iterations": AT_LEAST_ONE,  # deprecated feedback names, checked until they go
    "prompts_per_iteration": AT_LEAST_ONE,
    "steps_per_iteration": AT_LEAST_ONE,
    "max_samples_per_prompt": AT_LEAST_ONE,
    "max_pool_size": AT_LEAST_ONE,
    "num_length_buckets": AT_LEAST_ONE,
    # lengths and batches
    "max_length": AT_LEAST_ONE,
    "max_prompt_length": AT_LEAST_ONE,
    "max_completion_length": AT_LEAST_ONE,
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "precompute_ref_batch_size": AT_LEAST_ONE,
    # optimisation
    "learning_rate": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_ratio": UNIT,
    "max_grad_norm": NON_NEGATIVE,
    "num_train_epochs": NON_NEGATIVE,
}

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


def _type_error(config, name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{type(config).__name__}.{name} must be {expected}, got {value!r} ({type(value).__name__}).")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(config, name: str, value: Any, kind: str) -> None:
    if kind == "float" and not (_is_number(value) and math.isfinite(value)):
        raise _type_error(config, name, value, "a finite number")
    if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _type_error(config, name, value, "an integer")
    if kind == "bool" and not isinstance(value, bool):
        raise _type_error(config, name, value, "true or false")
    if kind == "str" and not isinstance(value, str):
        raise _type_error(config, name, value, "a string")
    if kind.startswith("list["):
        item_ok = (lambda v: isinstance(v, str)) if kind == "list[str]" else _is_number
        if not isinstance(value, list | tuple) or not all(item_ok(v) for v in value):
            expected = "a list of strings" if kind == "list[str]" else "a list of numbers"
            raise _type_error(config, name, value, expected)


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


def check_config_values(config) -> None:
    """Check the type of every field of the dataclass ``config`` that a plain check can judge (numbers and flags of
    every field; strings and lists of hf-align's own) and the range of every field named in :data:`RANGES`; warn
    when the run cannot learn (``learning_rate == 0``). Raises ``ValueError`` naming the field."""
    hints = _annotations(type(config))
    own = own_fields(type(config))
    for field in dataclasses.fields(config):
        if not field.init or field.name not in hints:
            continue
        value = getattr(config, field.name)
        kind, optional = _kind(hints[field.name])
        if kind is not None and field.name not in own and kind not in ("float", "int", "bool"):
            kind = None
        if value is None and (optional or kind is None):
            continue
        if kind is not None:
            if value is None:
                raise _type_error(config, field.name, value, f"a {kind} (it cannot be None)")
            _check_type(config, field.name, value, kind)
        rule = getattr(config, "RANGE_OVERRIDES", {}).get(field.name, RANGES.get(field.name))  # a class's own first
        if rule is not None and _is_number(value) and not rule.holds(value):
            raise ValueError(f"{type(config).__name__}.{field.name} must be {rule.describe()}, got {value!r}.")
    if getattr(config, "learning_rate", None) == 0:
        warnings.warn(f"{type(config).__name__}.learning_rate is 0: training will not change the model.", stacklevel=3)
