"""What every command shares: TRL's ``TrlParser`` with hf-align's recipe gate and old spellings, data, models.

Every command's options are dataclasses parsed by :class:`CommandParser` (TRL's ``TrlParser``), so every command
takes ``--config recipe.yaml`` plus any field as ``--field value``, and the same names mean the same thing
everywhere (``--model_name_or_path``, ``--dataset_name``, ``--output_dir``).

A recipe is a file someone may have sent you, so two of its keys need a flag on the command line: ``env:`` (TRL's
``TrlParser`` copies it into ``os.environ``; ``PYTHONPATH`` alone can make every process import a
``sitecustomize.py``) needs ``--allow_recipe_env``, and ``trust_remote_code: true`` (also inside any
``*_init_kwargs``) needs ``--trust_remote_code``.

Model names: a Hub id, a local directory, or ``testbed`` (the shipped tiny model).
Dataset names: a Hub id, a ``save_to_disk`` directory, a data file (``.json``/``.jsonl``/``.parquet``/``.csv``),
or ``testbed:<kind>`` with kind one of ``preference``, ``sft``, ``prompts``, ``forget``, ``retain``
(append ``-conversational`` for the chat format, e.g. ``testbed:preference-conversational``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_align.errors import UserError


if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


TESTBED_KINDS = ("preference", "sft", "prompts", "forget", "retain")
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
        argv = list(sys.argv[1:] if argv is None else argv)
        check_recipe(argv)
        drop = (*HIDDEN_SWITCHES, *((ALLOW_RECIPE_ENV,) if "allow_recipe_env" not in self.fields else ()))
        argv = self.modernize([arg for arg in argv if arg not in drop])
        kwargs = {"return_remaining_strings": True, "separate_remaining_strings": True} if remaining else {}
        try:
            parsed = self.parser.parse_args_and_config(argv, **kwargs)
        except UserError:
            raise
        except ValueError as err:
            raise UserError(str(err)) from err
        check_parsed_permissions(parsed, argv)
        guard_outputs(parsed, self.command)
        return parsed


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


def check_permissions(needed: list[tuple[str, str]], where: str) -> None:
    """Refuse, in one line naming ``where`` (the file), the key and the flag, the first of ``needed``."""
    for key, flag in needed:
        what = "sets environment variables" if flag == ALLOW_RECIPE_ENV else "would run code from the model folder"
        raise PermissionError(f"{where}: `{key}` {what}; only {flag} on the command line allows it.")


def check_recipe(argv: list[str]) -> None:
    """The ``--config`` recipe exists, has no key twice and asks for nothing that needs a command-line flag (before
    TRL applies it)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    from hf_align.trust import load_recipe

    path = Path(argv[argv.index("--config") + 1])
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such recipe file.")
    recipe = load_recipe(path)
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


OUTPUT_FIELDS = ("output_dir", "output_file", "merged_output_dir")
"""The fields that name what a command writes (each is locked while it runs, and kept apart from every input)."""
INPUT_FIELDS = (
    "model_name_or_path", "base_model_name_or_path", "reference_model", "adapter", "init", "trained", "scorer",
    "scorer_tokenizer", "chat_template_path", "dataset_name", "retain_dataset_name", "datasets", "neuron_mask_path",
    "reward", "reward_funcs",
)  # fmt: skip
"""The fields that name a model, reference, adapter, dataset, mask or reward model a command reads (a local path
counts; a Hub id or ``module:function`` does not). Saved scores are not protected: ``select-mask`` may write its
mask beside them."""
_SCOPES: list[contextlib.ExitStack] = []


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Where a command's output locks live: taken while its arguments are parsed (:func:`guard_outputs`), released
    when the command returns. The dispatcher opens one per command (a pipeline's stages get theirs); outside one (a
    process ``accelerate launch`` started, whose parent holds the lock) nothing is locked."""
    with contextlib.ExitStack() as stack:
        _SCOPES.append(stack)
        try:
            yield
        finally:
            _SCOPES.pop()


def io_paths(parsed: Iterable[Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``({--field: output}, {--field: input})`` of the parsed dataclasses (:data:`OUTPUT_FIELDS`,
    :data:`INPUT_FIELDS`; a list field's items as ``--field[i]``, a ``datasets`` mixture entry's ``path``)."""
    outputs: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for args in parsed:
        if not dataclasses.is_dataclass(args):
            continue
        for field in dataclasses.fields(args):
            value = getattr(args, field.name, None)
            if field.name in OUTPUT_FIELDS and isinstance(value, str | os.PathLike):
                outputs[f"--{field.name}"] = os.fspath(value)
            elif field.name in INPUT_FIELDS:
                items = value if isinstance(value, list | tuple) else [value]
                for index, item in enumerate(items):
                    item = getattr(item, "path", None) or (item.get("path") if isinstance(item, dict) else item)
                    if isinstance(item, str | os.PathLike) and os.fspath(item) != "testbed":  # the package's own
                        label = f"--{field.name}" + (f"[{index}]" if isinstance(value, list | tuple) else "")
                        inputs[label] = os.fspath(item)
    return outputs, inputs


def guard_outputs(parsed: Iterable[Any], command: str, outputs: dict | None = None, inputs: dict | None = None):
    """Before anything loads: no output is, contains or lies inside an input (:func:`hf_align.io.refuse_overlap`),
    then each output is locked for this command (:func:`hf_align.io.output_lock`) inside the current
    :func:`command_scope`. ``outputs``/``inputs``: more ``{label: path}`` beyond the parsed fields'."""
    from hf_align.io import output_lock, refuse_overlap

    found_outputs, found_inputs = io_paths(parsed)
    found_outputs.update(outputs or {})
    found_inputs.update(inputs or {})
    refuse_overlap(found_outputs, found_inputs)
    if not _SCOPES:
        return
    for output in found_outputs.values():
        _SCOPES[-1].enter_context(output_lock(output, f"hf-align {command}"))


def refuse_existing_output(path: str | Path, flag: str, overwrite: bool, names: Iterable[str] | None = None) -> None:
    """Refuse to replace an existing output unless ``--overwrite`` was given; the error names both flags.

    ``names``: the files a command writes into the folder ``path`` (it touches nothing else there), so only those
    count; without ``names`` any existing file, or a folder with anything in it, counts.
    """
    path = Path(path)
    if overwrite or not path.exists():
        return
    if names is not None:
        clashes = sorted(name for name in names if (path / name).exists())
        if clashes:
            raise FileExistsError(f"{flag} {str(path)!r} already holds {clashes}; pass --overwrite to replace them.")
    elif not path.is_dir() or any(path.iterdir()):
        raise FileExistsError(f"{flag} {str(path)!r} already exists and is not empty; pass --overwrite to replace it.")


def resolve_model_path(name: str) -> str:
    """``testbed`` → the shipped model's folder; anything else is passed through (Hub id or path)."""
    if name == "testbed":
        from hf_align.testbed import MODEL_DIR

        return str(MODEL_DIR)
    return name


def load_dataset_any(name: str, config: str | None = None, streaming: bool = False) -> DatasetDict:
    """Load a dataset by any of the names in the module docstring; always returns a ``DatasetDict``."""
    import datasets
    from datasets import DatasetDict

    if name.startswith("testbed:"):
        return DatasetDict({"train": _testbed_dataset(name.split(":", 1)[1])})
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if builder is None:
            raise UserError(
                f"dataset_name {name!r}: unsupported file type {path.suffix!r}; use .json, .jsonl, "
                ".parquet or .csv, a save_to_disk directory, or a Hub dataset id."
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
    return datasets.load_dataset(name, name=config, streaming=streaming)


def _testbed_dataset(kind: str) -> Dataset:
    from hf_align import testbed

    conversational = kind.endswith("-conversational")
    kind = kind.removesuffix("-conversational")
    makers = {
        "preference": testbed.preference_dataset,
        "sft": testbed.sft_dataset,
        "prompts": testbed.prompt_dataset,
        "forget": testbed.forget_dataset,
        "retain": testbed.retain_dataset,
    }
    if kind not in makers:
        raise UserError(f"dataset_name 'testbed:{kind}': unknown testbed dataset; choose one of {TESTBED_KINDS}.")
    return makers[kind](conversational=conversational)


def split(dataset: DatasetDict, name: str, source: str) -> Dataset:
    if name not in dataset:
        raise UserError(f"{source}: split {name!r} not found; available splits: {sorted(dataset)}.")
    return dataset[name]


def load_split(name: str, split_name: str, source: str, config: str | None = None, limit: int | None = None):
    """One split of a dataset named as in the module docstring, its first ``limit`` rows; an empty one is refused."""
    dataset = split(load_dataset_any(name, config), split_name, f"{source} {name!r}")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise UserError(f"{source} {name!r}: no rows in split {split_name!r}.")
    return dataset


def require_columns(dataset: Dataset, columns: Iterable[str], source: str, hint: str = "") -> None:
    """Fail before any model is loaded when a column is missing, naming it (the trainers check their own data)."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserError(f"{source}: missing column(s) {missing}; found {dataset.column_names}.{hint}")
