"""What every command shares: TRL's ``TrlParser`` with hf-align's recipe gate and old spellings.

Every command's options are dataclasses parsed by :class:`CommandParser` (TRL's ``TrlParser``), so every command
takes ``--config recipe.yaml`` plus any field as ``--field value``, and the same names mean the same thing
everywhere (``--model_name_or_path``, ``--dataset_name``, ``--output_dir``).

A recipe is a file someone may have sent you, so two of its keys need a flag on the command line: ``env:`` (TRL's
``TrlParser`` copies it into ``os.environ``; ``PYTHONPATH`` alone can make every process import a
``sitecustomize.py``) needs ``--allow_recipe_env``, and ``trust_remote_code: true`` (also inside any
``*_init_kwargs``) needs ``--trust_remote_code``.

Model and dataset names, splits, columns and outputs: :mod:`hf_align.scripts.utils`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hf_align.errors import UserError
from hf_align.progress import apply_output_switches
from hf_align.quiet import show_backend_notices


ALLOW_RECIPE_ENV = "--allow_recipe_env"
TRUST_REMOTE_CODE = "--trust_remote_code"
HIDDEN_SWITCHES = ("--no_launch",)
"""Accepted for old command lines, not listed: training commands run in this process unless a launch flag is given."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the description/epilog as written."""


class CommandParser:
    """``TrlParser`` over ``types`` with hf-align's recipe gate and one release of deprecated spellings.

    Before TRL reads the recipe, :func:`check_recipe` refuses what needs a command-line flag. ``renamed``
    (``{"--old": "--new"}``) is applied with a one-line warning on the command line and to recipe keys (and so is a
    kebab-case recipe key). ``strict``: an unknown recipe key is an error (training commands leave it to the
    launcher check, a recipe may hold ``accelerate launch`` flags). argparse's errors are one line.
    """

    def __init__(
        self,
        types: tuple[type, ...],
        prog: str,
        renamed: dict[str, str] | None = None,
        strict: bool = True,
        **kwargs: Any,
    ):
        from trl import TrlParser

        parser = self

        class _Parser(TrlParser):
            def set_defaults_with_config(self, **config):
                unknown = super().set_defaults_with_config(**{parser.modern(k, "key"): v for k, v in config.items()})
                if strict and unknown:  # before argparse asks for a required field the recipe may have misspelt
                    names = ", ".join(arg[2:] for arg in unknown[::2])
                    raise UserError(f"unknown field(s) in the recipe: {names}; see `{prog} --help`.")
                return unknown

            def error(self, message: str):  # argparse's documented hook: one line instead of usage + message
                raise UserError(f"{message}; see `{prog} --help`.")

        self.command = prog.removeprefix("hf-align ")
        self.renamed = dict(renamed or {})
        from hf_align.progress import ProgressArguments
        from hf_align.quiet import VerboseArguments

        given = {f.name for t in types for f in dataclasses.fields(t)}
        self.switches = (VerboseArguments, *((ProgressArguments,) if "disable_tqdm" not in given else ()))
        types = (*types, *self.switches)
        fields = [f for t in types for f in dataclasses.fields(t)]
        self.fields = {f.name for f in fields}
        self.list_flags = {f"--{f.name}" for f in fields if "list[" in str(f.type).lower()}
        usage = f"{prog} [--config RECIPE.yaml] [--field value ...]"
        self.parser = _Parser(
            types, prog=prog, usage=kwargs.pop("usage", usage), formatter_class=_HelpFormatter, **kwargs
        )

    def format_help(self) -> str:
        return self.parser.format_help()

    def modern(self, name: str, kind: str = "flag") -> str:
        """The current spelling of flag ``--name`` (``kind='flag'``) or of recipe key ``name`` (``kind='key'``).

        Kebab-case flags stay as they are (``HfArgumentParser`` accepts both spellings); a kebab-case recipe key,
        which the old ``merge`` recipe loader accepted, is renamed with a warning.
        """
        flag = name if kind == "flag" else f"--{name}"
        snake = "--" + flag[2:].replace("-", "_")
        new = self.renamed.get(snake) or (snake if kind == "key" and snake != flag else None)
        if new is None:
            return name
        old, new = (flag, new) if kind == "flag" else (f"recipe key {name!r}", new[2:])
        print(
            f"FutureWarning: hf-align {self.command}: {old} is deprecated, use {new} instead (the old spelling goes "
            "in the next release).",
            file=sys.stderr,
            flush=True,
        )
        return new

    def modernize(self, argv: list[str]) -> list[str]:
        """``argv`` with current spellings, and each list field's repeated flag (``--reward a --reward b``, the
        old argparse ``append`` style) joined into one (``--reward a b``)."""
        out: list[Any] = []
        lists: dict[str, list[str]] = {}
        current: list[str] | None = None
        for arg in argv:
            if arg.startswith("--"):
                name, sep, value = arg.partition("=")
                arg, current = self.modern(name) + sep + value, None
                if arg in self.list_flags:
                    if arg not in lists:
                        out += [arg, lists.setdefault(arg, [])]
                    current = lists[arg]
                    continue
            (out if current is None else current).append(arg)
        return [item for entry in out for item in (entry if isinstance(entry, list) else [entry])]

    def parse(self, argv: list[str] | None = None, remaining: bool = False) -> tuple:
        """The dataclass instances (``remaining``: then the recipe's and the command line's unknown strings).

        A ``ValueError`` raised while parsing (a field's check, TRL's config checks) is the user's: a
        :class:`~hf_align.errors.UserError`.
        """
        argv = find_config(list(sys.argv[1:] if argv is None else argv))
        check_recipe(argv)
        drop = (*HIDDEN_SWITCHES, *((ALLOW_RECIPE_ENV,) if "allow_recipe_env" not in self.fields else ()))
        argv = self.modernize([arg for arg in argv if arg not in drop])
        if switch_on(argv, "--verbose"):  # before parsing: TrainingArguments warns while it is built
            show_backend_notices()
        kwargs = {"return_remaining_strings": True, "separate_remaining_strings": True} if remaining else {}
        try:
            parsed = self.parser.parse_args_and_config(argv, **kwargs)
        except UserError:
            raise
        except ValueError as err:
            raise UserError(str(err)) from err
        check_parsed_permissions(parsed, argv)
        apply_output_switches(parsed)
        parsed = tuple(obj for obj in parsed if not isinstance(obj, self.switches))
        from hf_align.scripts.outputs import guard_outputs

        guard_outputs(parsed, self.command)  # before anything loads: outputs apart from inputs, then locked
        return parsed


def split_config_flag(argv: list[str]) -> list[str]:
    """``--config=r.yaml`` as ``--config r.yaml``: TRL's parser looks for the two-word form only, so the ``=`` form
    was not read as a recipe (nor checked by the recipe gate)."""
    out: list[str] = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        out += [flag, value] if sep and flag == "--config" else [arg]
    return out


def parse_command(prog: str, types: tuple[type, ...], argv: list[str] | None, **kwargs: Any) -> tuple:
    """Parse a non-training command: every field known, ``--config`` allowed; one line on a mistake."""
    return CommandParser(types, prog, **kwargs).parse(argv)


def recipe_permissions(recipe: dict[str, Any], argv: list[str]) -> list[tuple[str, str]]:
    """(key, command-line flag) for each thing in ``recipe`` that only a command-line flag may switch on and
    ``argv`` does not: ``env`` and every ``trust_remote_code`` its reader takes as true (:mod:`hf_align.trust`)."""
    from hf_align import trust

    env_allowed = any(arg.partition("=")[0] == ALLOW_RECIPE_ENV for arg in argv)
    needed = [("env", ALLOW_RECIPE_ENV)] if recipe.get("env") and not env_allowed else []
    if not trust.flag_given(argv):
        needed += [(f"{key}` = `{value!r}", TRUST_REMOTE_CODE) for key, value in trust.code_requests(recipe)]
    return needed


def switch_on(argv: list[str], flag: str) -> bool:
    """Whether boolean ``flag`` is switched on in ``argv``, as the parser reads it (:func:`trust.switched_on`)."""
    from hf_align.trust import switched_on

    return switched_on(argv, lambda name: name == flag)


def check_permissions(needed: list[tuple[str, str]], where: str) -> None:
    """Refuse, in one line naming ``where`` (the file), the key and the flag, the first of ``needed``."""
    for key, flag in needed:
        what = "sets environment variables" if flag == ALLOW_RECIPE_ENV else "would run code from the model folder"
        raise PermissionError(f"{where}: `{key}` {what}; only {flag} on the command line allows it.")


def find_config(argv: list[str]) -> list[str]:
    """``argv`` with its ``--config`` value made a path: a file that exists, else a shipped recipe's name
    (:func:`hf_align.scripts.recipes.find_recipe`); ``--config=NAME`` is read as ``--config NAME``."""
    argv = split_config_flag(argv)
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return argv
    from hf_align.scripts.recipes import find_recipe

    index = argv.index("--config") + 1
    return [*argv[:index], str(find_recipe(argv[index])), *argv[index + 1 :]]


def check_recipe(argv: list[str]) -> None:
    """The ``--config`` recipe exists, has no key twice and asks for nothing that needs a command-line flag (before
    TRL applies it)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    from hf_align.io import read_yaml

    path = Path(argv[argv.index("--config") + 1])
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such recipe file.")
    recipe = read_yaml(path, "recipe")  # one line for a syntax error or a binary file, before TRL reads it
    if isinstance(recipe, dict):
        check_permissions(recipe_permissions(recipe, argv), f"recipe {str(path)!r}")


def check_parsed_permissions(parsed: Iterable[Any], argv: list[str]) -> None:
    """After parsing: a ``trust_remote_code`` nested in a field given on the command line (``--model_init_kwargs
    '{"trust_remote_code": true}'``) needs the flag too; the recipe's were refused, naming the file, before."""
    from hf_align import trust

    for args in parsed:
        if dataclasses.is_dataclass(args):
            values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(args) if f.name != trust.FIELD}
            trust.check_code_requests(values, trust.flag_given(argv), "command line")
