"""What every training command shares: parsers, model and dataset resolution, column checks, recipe permissions.

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

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict


TESTBED_KINDS = ("preference", "sft", "prompts", "forget", "retain")
ALLOW_RECIPE_ENV = "--allow_recipe_env"
TRUST_REMOTE_CODE = "--trust_remote_code"


def make_trl_parser(config_class: type, prog: str, extra: tuple[type, ...] = ()):
    """``TrlParser`` over (ScriptArguments, <config>, ModelConfig, *extra): YAML recipe + CLI overrides.

    Its ``parse_args_and_config`` first runs :func:`check_recipe` (before TRL copies the recipe's ``env:`` into
    ``os.environ``) and drops ``--allow_recipe_env``, which is hf-align's switch, not a field.
    """
    from trl import ModelConfig, ScriptArguments, TrlParser

    class CheckedTrlParser(TrlParser):
        def parse_args_and_config(self, args=None, *rest, **kwargs):
            args = list(sys.argv[1:] if args is None else args)
            check_recipe(args)
            return super().parse_args_and_config([a for a in args if a != ALLOW_RECIPE_ENV], *rest, **kwargs)

    return CheckedTrlParser((ScriptArguments, config_class, ModelConfig, *extra), prog=prog)


def recipe_permissions(recipe: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, command-line flag) for each thing in ``recipe`` that only a command-line flag may switch on."""
    needed = []
    if recipe.get("env"):
        needed.append(("env", ALLOW_RECIPE_ENV))
    if _truthy(recipe.get("trust_remote_code")):
        needed.append(("trust_remote_code", TRUST_REMOTE_CODE))
    for key, value in recipe.items():
        if str(key).endswith("init_kwargs") and _truthy(_as_mapping(value).get("trust_remote_code")):
            needed.append((f"{key}.trust_remote_code", TRUST_REMOTE_CODE))
    return needed


def _as_mapping(value: Any) -> dict:
    """A ``*_init_kwargs`` value: a mapping in YAML, a JSON string once it is a command-line argument."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "yes", "1")


def given_flags(argv: list[str]) -> set[str]:
    """The permission flags switched on in ``argv`` (``--trust_remote_code`` alone, ``=true`` or ``true``)."""
    flags = set()
    for index, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        if flag == ALLOW_RECIPE_ENV:
            flags.add(flag)
        elif flag == TRUST_REMOTE_CODE:
            following = argv[index + 1] if index + 1 < len(argv) else "--"
            value = value if sep else ("true" if following.startswith("--") else following)
            if _truthy(value):
                flags.add(flag)
    return flags


def check_permissions(needed: list[tuple[str, str]], flags: set[str], where: str) -> None:
    """Refuse, in one line naming the key and the flag, what ``where`` asks for without its flag."""
    for key, flag in needed:
        if flag not in flags:
            what = "sets environment variables" if flag == ALLOW_RECIPE_ENV else "runs code from the model folder"
            raise PermissionError(f"{where}: `{key}` {what}; pass {flag} on the command line to allow it.")


def check_recipe(argv: list[str]) -> None:
    """The ``--config`` recipe exists and asks for nothing that needs a command-line flag (before TRL applies it)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    import yaml

    path = Path(argv[argv.index("--config") + 1])
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such recipe file.")
    recipe = yaml.safe_load(path.read_text())
    if isinstance(recipe, dict):
        check_permissions(recipe_permissions(recipe), given_flags(argv), f"recipe {str(path)!r}")


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

    if name.startswith("testbed:"):
        return DatasetDict({"train": _testbed_dataset(name.split(":", 1)[1])})
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"dataset_name {name!r}: unsupported file type {path.suffix!r}; use .json, .jsonl, "
                ".parquet or .csv, a save_to_disk directory, or a Hub dataset id."
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)})
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
        raise ValueError(f"dataset_name 'testbed:{kind}': unknown testbed dataset; choose one of {TESTBED_KINDS}.")
    return makers[kind](conversational=conversational)


def split(dataset: DatasetDict, name: str, source: str) -> Dataset:
    if name not in dataset:
        raise ValueError(f"{source}: split {name!r} not found; available splits: {sorted(dataset)}.")
    return dataset[name]


def require_columns(dataset: Dataset, columns: Iterable[str], source: str) -> None:
    """Fail before training when a column the method needs is missing, naming it."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {dataset.column_names}.")


def model_init_kwargs(model_args, training_args) -> dict[str, Any]:
    """The ``from_pretrained`` kwargs TRL's own scripts build from ``ModelConfig``."""
    from trl import get_quantization_config

    kwargs: dict[str, Any] = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        from trl import get_kbit_device_map

        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = get_kbit_device_map()
    if getattr(training_args, "model_init_kwargs", None):
        kwargs.update(training_args.model_init_kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def load_model_and_tokenizer(model_args, training_args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path)
    model_args.model_name_or_path = path
    model = AutoModelForCausalLM.from_pretrained(path, **model_init_kwargs(model_args, training_args))
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def train_and_save(trainer, training_args, script_args) -> None:
    """Train (resuming if asked), save, optionally push: the tail every command shares."""
    from hf_align.callbacks.json_training_args import JsonTrainingArgsCallback, replace_training_args_pickle

    if not any(isinstance(c, JsonTrainingArgsCallback) for c in trainer.callback_handler.callbacks):
        trainer.add_callback(JsonTrainingArgsCallback())
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history the pipeline summary reads
    if trainer.is_world_process_zero():
        replace_training_args_pickle(training_args.output_dir, trainer.args)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
