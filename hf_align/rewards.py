"""Rewards, written once: what a reward spec names, how a reward model scores text, what a valid score is.

``hf-align eval``, :class:`~hf_align.trainers.FeedbackConditionedTrainer` and ``hf-align label-tokens`` all
resolve their functions here, so one spec means one function everywhere and a reward model gives the same
number for the same completion whether it scores during training or in an evaluation.

A reward spec is one of

* a callable ``f(prompts, completions, **kwargs) -> list[float | None]`` (TRL GRPO's ``reward_funcs`` form,
  ``async def`` too; see :func:`score_completions` for what it is called with);
* ``"package.module:function"`` or ``"package.module.function"`` (as TRL's GRPO script writes it; a module in the
  working directory is found too, as there);
* an alias from :data:`REWARD_ALIASES` (``"testbed"`` and the names TRL's GRPO script knows, e.g.
  ``"think_format_reward"``), imported by name so core never imports the testbed;
* a folder (or cached Hub id ``owner/name``) of a one-logit ``AutoModelForSequenceClassification``, or such a
  model object: scored by :class:`RewardModelScorer` exactly as TRL's GRPO scores with a reward model.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_align.errors import UserError


RewardFunc = Callable[..., Sequence[Any]]

REWARD_ALIASES = {
    "testbed": "hf_align.testbed:reward",
    # the registry of TRL's GRPO script (trl/scripts/grpo.py), minus its one factory
    "accuracy_reward": "trl.rewards:accuracy_reward",
    "reasoning_accuracy_reward": "trl.rewards:reasoning_accuracy_reward",
    "think_format_reward": "trl.rewards:think_format_reward",
}
"""Short names for reward functions, resolved to their import path on use."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXPECTED = "'testbed', 'package.module:function', 'package.module.function' or a reward-model folder"

__all__ = [
    "REWARD_ALIASES",
    "RewardFunc",
    "RewardModelScorer",
    "as_score",
    "call_user_function",
    "check_reward_weights",
    "check_signature",
    "check_scores",
    "function_label",
    "import_callable",
    "resolve_reward",
    "resolve_reward_funcs",
    "reward_name",
    "score_completions",
]


def import_callable(spec: str, what: str = "reward") -> Callable:
    """``'package.module:function'`` or ``'package.module.function'`` → the function; a failure is a one-line
    ``ValueError`` naming ``what`` (the field or flag) and the spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    try:
        if not module_name or not attr:
            raise ValueError("no module or no function name")
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, ModuleNotFoundError) and os.path.exists(f"{module_name.split('.')[0]}.py"):
            message += " (the current folder is never on the import path: PYTHONPATH=. to use it, see SECURITY.md)"
        raise UserError(f"{what} {spec!r} cannot be imported ('package.module:function'): {message}") from None
    if not callable(func):
        raise UserError(f"{what} {spec!r} is not callable.")
    return func


def function_label(func: Any) -> str:
    """``module:function`` of a user function (what a recipe names it by), else its display name."""
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return f"{module}:{name}" if module and name else reward_name(func)


def check_signature(
    func: Callable, what: str, *args: Any, label: str | None = None, partial: bool = False, **kwargs: Any
) -> None:
    """Refuse, before anything runs, a function that cannot take the arguments it will be called with (``os:system``
    named as a reward: ``system(command)`` takes no ``prompts=``/``completions=``). ``partial``: the call passes more
    than ``args``/``kwargs`` (a reward also gets ``completion_ids``, ``trainer_state`` and the dataset's columns, as
    GRPO passes them), so only what is given must fit. A signature Python cannot read (some builtins) is let through:
    the call then says what is wrong."""
    import inspect

    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return
    try:
        (signature.bind_partial if partial else signature.bind)(*args, **kwargs)
    except TypeError as err:
        given = ", ".join([*("…" for _ in args), *(f"{k}=" for k in kwargs)])
        label = label or function_label(func)
        raise UserError(
            f"{what} {label!r} cannot be called as f({given}), as it will be: its signature is {label}{signature} "
            f"({err})."
        ) from None


def call_user_function(func: Callable, what: str, *args: Any, **kwargs: Any) -> list:
    """``func(*args, **kwargs)`` as a list (an ``async def`` one run to completion), where an exception or a result
    that is no sequence is one line naming ``what`` and ``module:function`` (``HF_ALIGN_DEBUG=1``: the traceback)."""
    from trl.trainer.utils import is_async_callable

    label = function_label(func)
    try:
        result = asyncio.run(func(*args, **kwargs)) if is_async_callable(func) else func(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the user's code: its error, named with the function
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{what} {label!r} raised {type(err).__name__}: {message}".rstrip(": ")) from err
    if isinstance(result, str | bytes | dict) or not isinstance(result, Sequence | torch.Tensor):
        kind = type(result).__name__
        raise UserError(f"{what} {label!r} returned a {kind}; expected a list with one value per completion.")
    return list(result)


class RewardModelScorer:
    """A sequence-classification reward model as a reward function, fed exactly what TRL's GRPO feeds it.

    Conversational rows are joined (prompt messages + completion messages) and rendered with the reward
    tokenizer's chat template through TRL's ``apply_chat_template``; standard rows are ``prompt + completion``.
    The texts are tokenized with right padding and no extra special tokens, and the first logit is the reward.
    A string completion of a conversational prompt counts as one assistant message.
    """

    def __init__(self, model, tokenizer=None, name: str | None = None):
        from trl.trainer.utils import get_config_model_id

        from hf_align.loading import load_tokenizer

        if tokenizer is None:
            tokenizer = load_tokenizer(get_config_model_id(model.config))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The model scores the last non-padded token, so it must know the tokenizer's pad id (as GRPO sets it).
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.__name__ = (name or get_config_model_id(model.config)).rstrip("/").split("/")[-1]  # GRPO's name

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        """The strings the reward model reads, one per (prompt, completion)."""
        from trl.data_utils import apply_chat_template, is_conversational

        if prompts and is_conversational({"prompt": prompts[0]}):
            messages = [p + (c if isinstance(c, list) else [{"role": "assistant", "content": c}]) for p, c in
                        zip(prompts, completions, strict=True)]  # fmt: skip
            return [apply_chat_template({"messages": m}, self.tokenizer)["text"] for m in messages]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        enc = self.tokenizer(
            text=self.texts(prompts, completions),
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        ).to(self.model.device)
        with torch.inference_mode():
            return self.model(**enc).logits[:, 0].float().tolist()


def reward_name(func: Any) -> str:
    """Display name of a resolved reward function (TRL's ``get_callable_name``)."""
    from trl.trainer.utils import get_callable_name

    return get_callable_name(func)


def resolve_reward(spec: Any, what: str = "reward") -> RewardFunc:
    """One reward spec (see the module docstring) → a callable ``f(prompts, completions, **columns)``."""
    from transformers import PreTrainedModel

    if isinstance(spec, PreTrainedModel):
        return RewardModelScorer(spec)
    if callable(spec):
        check_signature(spec, what, prompts=[], completions=[], partial=True)
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{what} entries must be names, callables or reward models; got {type(spec).__name__}.")
    spec_path = REWARD_ALIASES.get(spec, spec)
    if os.path.isdir(spec_path):
        return _load_reward_model(spec_path, what)
    if ":" in spec_path or ("." in spec_path and "/" not in spec_path and os.sep not in spec_path):
        func = import_callable(spec_path, what)
        check_signature(func, what, prompts=[], completions=[], label=spec_path, partial=True)
        return func
    if _HUB_ID.match(spec_path) and not os.path.exists(spec_path):
        return _load_reward_model(spec_path, what)  # a Hub id: from the cache when offline
    raise UserError(f"unknown {what} {spec!r}: expected {_EXPECTED}.")


def _load_reward_model(name: str, what: str) -> RewardModelScorer:
    from transformers import AutoModelForSequenceClassification

    from hf_align.loading import load_model

    try:
        model = load_model(name, architecture=AutoModelForSequenceClassification, num_labels=1)
        return RewardModelScorer(model, name=name)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{what} {name!r} is not a loadable reward model (expected {_EXPECTED}): {str(err).splitlines()[0]}"
        ) from None


def resolve_reward_funcs(
    specs: Any | Sequence[Any] | None, what: str = "reward"
) -> tuple[list[RewardFunc], list[str]]:
    """Every spec resolved, with its name as TRL's GRPO logs it (``rewards/<name>/mean``): the function's name, a
    reward model's last path part. A name already taken gets ``_2``, ``_3``, ... so no two share a log key."""
    if specs is None:
        return [], []
    items = list(specs) if isinstance(specs, list | tuple) else [specs]
    funcs = [resolve_reward(item, what) for item in items]
    names: list[str] = []
    for func in funcs:
        name, n = reward_name(func), 1
        while name in names:
            n += 1
            name = f"{reward_name(func)}_{n}"
        names.append(name)
    return funcs, names


def as_score(value: Any, index: int, source: str, allow_none: bool = False) -> float | None:
    """A finite float (or ``None`` where allowed), else a ``ValueError`` naming ``source`` and the row."""
    if value is None and allow_none:
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} returned {value!r} for completion {index}; expected a number.") from None
    if not math.isfinite(score):
        raise ValueError(f"{source} returned a non-finite score {value!r} for completion {index}.")
    return score


def check_scores(values: Sequence[Any], count: int, source: str, allow_none: bool = False) -> list[float | None]:
    """One finite float (or, where allowed, ``None``) per completion from ``source`` (a function's output), or a
    ``ValueError`` saying why."""
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{source} returned {len(values)} scores for {count} completions.")
    return [as_score(v, i, source, allow_none) for i, v in enumerate(values)]


def check_reward_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """GRPO's ``reward_weights``: one per reward function (``None``: all 1), else a one-line error."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UserError(f"reward_weights has {len(weights)} entries for {count} reward functions.")
    return [float(w) for w in weights]


def score_completions(
    reward_funcs: Sequence[RewardFunc],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    names: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    **columns: Any,
) -> tuple[list[float | None], list[list[float | None]]]:
    """Each function's checked rewards and their weighted sum per completion, as TRL's GRPO computes them.

    Every function is called as GRPO calls it: ``prompts=``, ``completions=`` (strings, or lists of messages for
    conversational data) and ``**columns`` (the dataset's other columns, one value per completion, plus whatever
    the caller adds: ``completion_ids``, ``trainer_state``, ``log_metric``, ``log_extra``). A ``None`` reward means
    "does not apply": the sum is over the functions that scored (GRPO's ``nansum``, weights default 1), and a
    completion no function scored has total ``None``.
    """
    del names  # the log keys; errors name each function by module:function
    weights = check_reward_weights(weights, len(reward_funcs))
    per_func = [
        check_scores(call_user_function(func, "reward function", prompts=list(prompts), completions=list(completions),
                                        **columns),
                     len(completions), f"reward function {function_label(func)!r}", allow_none=True)
        for func in reward_funcs
    ]  # fmt: skip
    totals = []
    for vals in zip(*per_func):
        given = [w * v for w, v in zip(weights, vals, strict=True) if v is not None]
        totals.append(sum(given) if given else None)
    return totals, per_func
