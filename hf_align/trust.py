"""What a recipe may not do: switch on ``trust_remote_code``, or say one key twice.

A recipe is a file someone may have sent you. Only the command line's ``--trust_remote_code`` (or an explicit
``trust_remote_code=True`` in Python) lets a model folder's ``auto_map`` code run, so every other place a value can
reach ``trust_remote_code`` is refused when *the library that reads it* would take it as true:

- a recipe's top-level field (and a pipeline's ``set:``/stage ``args``/``--set``, which become a stage's command
  line) is read by ``HfArgumentParser``: a string through its ``string_to_bool`` (``t``, ``Y``, ``yes``, ``1``, ...),
  anything else (YAML 1.1 booleans such as ``on``, a ``2``) by Python truthiness, as argparse keeps a non-string
  default as it is;
- a nested ``trust_remote_code`` (``model_init_kwargs``, ``ref_model_init_kwargs``, any ``*_init_kwargs``, also as a
  JSON string) goes to ``from_pretrained``, which tests ``not trust_remote_code``: the string ``"false"`` is true.

A value the reader cannot parse counts as true (refused rather than guessed). Recipes are read by
:func:`hf_align.io.read_yaml`, which refuses a key given twice in one mapping (``yaml.safe_load``, which TRL uses,
keeps the last silently).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from hf_align.errors import UserError


FIELD = "trust_remote_code"
FLAG = "--trust_remote_code"
PARSER, LOADER = "HfArgumentParser", "from_pretrained"
"""The two readers of a ``trust_remote_code`` value (see the module docstring)."""


def enables_code(value: Any, reader: str) -> bool:
    """Whether ``reader`` (:data:`PARSER` or :data:`LOADER`) would let ``value`` run a model folder's code."""
    if value is None or value is False:
        return False
    if reader == PARSER and isinstance(value, str):
        from transformers.hf_argparser import string_to_bool

        try:
            return bool(string_to_bool(value))
        except Exception:  # argparse refuses it: not a yes/no the parser knows, so not a "no" we can vouch for
            return True
    try:
        return bool(value)
    except Exception:
        return True


def code_requests(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(field, value)`` for every ``trust_remote_code`` in ``values`` (a recipe, a pipeline's ``set``/``args``,
    parsed arguments) whose reader would take it as true: at the top level as the parser reads it, nested (in a
    mapping, a list, or a JSON string of one) as ``from_pretrained`` reads it."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if _is_field(key):
            if enables_code(value, LOADER if prefix else PARSER):
                yield name, value
        else:
            yield from _nested(value, f"{name}.")


def _is_field(key: Any) -> bool:
    """``trust_remote_code`` in any spelling its reader accepts (``trust-remote-code``: a kebab-case recipe key and
    flag are read as the snake-case one)."""
    return str(key).replace("-", "_") == FIELD


def _nested(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
        try:
            value = json.loads(value)
        except ValueError:
            return
    if isinstance(value, Mapping):
        yield from code_requests(value, prefix)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _nested(item, f"{prefix[:-1]}[{index}].")


def check_code_requests(values: Mapping[str, Any], allowed: bool, where: str) -> None:
    """Refuse, in one line naming ``where`` (the file) and the field, a true ``trust_remote_code`` unless
    ``allowed`` (the command line's flag was given)."""
    if allowed:
        return
    for name, value in code_requests(values):
        raise PermissionError(
            f"{where}: `{name}` = `{value!r}` would run code from the model folder; only {FLAG} on the command line "
            "allows it."
        )


def flag_given(argv: list[str]) -> bool:
    """Whether ``argv`` switches ``--trust_remote_code`` on, as ``HfArgumentParser`` reads it (a bare flag, or a
    value after it or after ``=`` that ``string_to_bool`` takes as true); the last one counts."""
    return switched_on(argv, lambda flag: flag.startswith("--") and _is_field(flag[2:]))


def switched_on(argv: list[str], is_flag: Callable[[str], bool]) -> bool:
    """Whether the boolean flag that ``is_flag`` recognises is on in ``argv`` as the parser reads it: alone, or with
    a value (after it or after ``=``) that ``string_to_bool`` takes as true; the last one counts."""
    on = False
    for index, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        if is_flag(flag):
            following = argv[index + 1] if index + 1 < len(argv) else "--"
            on = enables_code(value if sep else (True if following.startswith("-") else following), PARSER)
    return on


def require_bool(value: Any, where: str) -> bool:
    """``value`` when it is ``True``/``False``: the Python API's explicit argument. Anything else (``"false"``,
    ``1``) is refused: ``from_pretrained`` would read ``"false"`` as true."""
    if value is True or value is False:
        return value
    raise UserError(f"{where}: trust_remote_code must be True or False, got {value!r} ({type(value).__name__}).")
