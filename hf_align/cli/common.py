"""What every training command shares: TRL's script plumbing (parser, data, model kwargs), recipe permissions.

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
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


TESTBED_KINDS = ("preference", "sft", "prompts", "forget", "retain")
ALLOW_RECIPE_ENV = "--allow_recipe_env"
TRUST_REMOTE_CODE = "--trust_remote_code"


LAUNCH_HELP = (
    (
        "--num_processes N",
        "Start N processes through `accelerate launch` (CPU-only machines: torch.distributed, gloo).",
    ),
    ("--config_file FILE", "An accelerate config (DeepSpeed, FSDP, multi-GPU); launches through `accelerate launch`."),
    (
        "--accelerate_config NAME",
        "TRL's shipped accelerate configs by name (zero2, zero3, fsdp2, ...) or a file path.",
    ),
    (
        "--multi_gpu, --mixed_precision, ...",
        "Any other `accelerate launch` flag also launches (see `accelerate launch -h`).",
    ),
)
"""What ``--help`` lists as the launch flags: without any of them a training command runs in this process."""


def make_trl_parser(config_class: type, prog: str, extra: tuple[type, ...] = (), mixture: bool = False):
    """``TrlParser`` over TRL's script tuple (ScriptArguments, <config>, ModelConfig[, DatasetMixtureConfig], *extra).

    ``mixture``: also TRL's ``DatasetMixtureConfig`` (``datasets:``, ``streaming``, ``test_split_size``), as in
    ``trl dpo``/``trl sft``; ``run`` then receives its instance after ``ModelConfig``. Its ``parse_args_and_config``
    first runs :func:`check_recipe` (before TRL copies the recipe's ``env:`` into ``os.environ``) and drops
    ``--allow_recipe_env``, which is hf-align's switch, not a field. Its help lists hf-align's own flags first,
    then the launch flags, then TRL's groups (data, model, training config).
    """
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    mixture_types = (DatasetMixtureConfig,) if mixture else ()
    types = (ScriptArguments, config_class, ModelConfig, *mixture_types, *extra)

    class CheckedTrlParser(TrlParser):
        def parse_args_and_config(self, args=None, *rest, **kwargs):
            args = list(sys.argv[1:] if args is None else args)
            check_recipe(args)
            args = [a for a in args if a not in (ALLOW_RECIPE_ENV, *HIDDEN_SWITCHES)]
            return super().parse_args_and_config(args, *rest, **kwargs)

        def format_help(self) -> str:
            return _grouped_help(self, config_class, types, extra)

    usage = f"{prog} [--config RECIPE.yaml] [--field value ...] [launch flags]"
    return CheckedTrlParser(types, prog=prog, usage=usage)


HIDDEN_SWITCHES = ("--no_launch",)
"""Accepted for old command lines, not listed: training commands run in this process unless a launch flag is given."""


def _grouped_help(parser, config_class: type, types: tuple[type, ...], extra: tuple[type, ...]) -> str:
    """Help in sections, hf-align's first: its own flags, launch flags, then TRL's data, model and training fields."""
    import argparse
    import dataclasses

    parent = next((c for c in config_class.__mro__ if c.__module__.startswith(("trl.", "transformers."))), object)
    inherited = {f.name for f in dataclasses.fields(parent)} if dataclasses.is_dataclass(parent) else set()
    own = {f.name for f in dataclasses.fields(config_class)} - inherited
    own |= {f.name for t in extra for f in dataclasses.fields(t)}
    owner: dict[str, str] = {}
    for dataclass_type in types:
        for f in dataclasses.fields(dataclass_type):
            owner.setdefault(f.name, "own" if f.name in own else dataclass_type.__name__)
    sections: dict[str, list] = {}
    for action in parser._actions:
        if action.dest != "help":
            sections.setdefault(owner.get(action.dest, "own"), []).append(action)

    scratch, hidden = argparse.ArgumentParser(add_help=False), argparse.SUPPRESS
    head = [
        scratch.add_argument("-h", "--help", action="store_true", default=hidden, help="Show this message and exit."),
        scratch.add_argument(
            "--config", metavar="RECIPE.yaml", default=hidden, help="A YAML recipe: any field below as a key."
        ),
        scratch.add_argument(
            ALLOW_RECIPE_ENV, action="store_true", default=hidden, help="Let the recipe's `env:` set variables."
        ),
    ]
    launch = [
        scratch.add_argument(flag, dest=f"launch{i}", default=hidden, help=text)
        for i, (flag, text) in enumerate(LAUNCH_HELP)
    ]
    for action in launch:
        action.option_strings, action.metavar, action.nargs = [action.option_strings[0]], argparse.SUPPRESS, 0
    titles = [
        ("own", f"hf-align options ({parser.prog}'s own fields)", head + sections.pop("own", [])),
        ("launch", "launch flags (without one, the command runs in this process)", launch),
        *((name, f"{name} (TRL)", sections.pop(name, [])) for name in ("ScriptArguments", "DatasetMixtureConfig")),
        ("ModelConfig", "ModelConfig (TRL)", sections.pop("ModelConfig", [])),
        *((name, f"{name} (TRL / transformers training fields)", actions) for name, actions in sections.items()),
    ]
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, [], [])
    formatter.add_text(parser.description)
    for _, title, actions in titles:
        if actions:
            formatter.start_section(title)
            formatter.add_arguments(actions)
            formatter.end_section()
    return formatter.format_help()


def add_kebab_aliases(parser) -> None:
    """Accept ``--max-shard-size`` for every ``--max_shard_size`` option, unlisted: TRL's ``--snake_case`` is the one
    spelling the help shows across commands; the other keeps old command lines working."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            alias = "--" + option[2:].replace("_", "-")
            if option.startswith("--") and alias != option and alias not in parser._option_string_actions:
                parser._option_string_actions[alias] = action


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
            raise ValueError(
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
        raise ValueError(f"dataset_name 'testbed:{kind}': unknown testbed dataset; choose one of {TESTBED_KINDS}.")
    return makers[kind](conversational=conversational)


def split(dataset: DatasetDict, name: str, source: str) -> Dataset:
    if name not in dataset:
        raise ValueError(f"{source}: split {name!r} not found; available splits: {sorted(dataset)}.")
    return dataset[name]


def require_columns(dataset: Dataset, columns: Iterable[str], source: str) -> None:
    """Fail before training when a column the method needs is missing, naming it (``eval``, ``feedback``; the
    training commands leave column checks to their trainers)."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {dataset.column_names}.")


def model_init_kwargs(model_args, training_args) -> dict[str, Any]:
    """The ``from_pretrained`` kwargs TRL's own scripts build from ``ModelConfig`` (``trl/scripts/dpo.py``), plus
    ``quantization_config`` (TRL's ``get_quantization_config``) when ``--load_in_4bit``/``--load_in_8bit`` asks for it:
    as in TRL, no ``device_map`` is forced (TRL's model loading picks it)."""
    from trl import get_quantization_config

    kwargs: dict[str, Any] = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if getattr(training_args, "model_init_kwargs", None):
        kwargs.update(training_args.model_init_kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def trainer_model(model_args, training_args) -> str:
    """The model path to hand a trainer, which builds it as TRL does from ``training_args.model_init_kwargs``.

    The kwargs (with the quantization config: TRL's trainers fold a ``quantization_config`` argument into the same
    dict) go through the config rather than a trainer argument, so hf-align's trainers, which may load the model
    themselves to check a mask against it, build exactly the same model.
    """
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    return model_args.model_name_or_path


def load_model_and_tokenizer(model_args, training_args):
    """A loaded model and tokenizer, for commands that need the objects before the trainer does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path)
    model_args.model_name_or_path = path
    model = AutoModelForCausalLM.from_pretrained(path, **model_init_kwargs(model_args, training_args))
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_training_data(script_args, dataset_args, training_args) -> tuple[Any, Any]:
    """(train, eval) as ``trl dpo``/``trl sft`` choose them: TRL's ``get_dataset`` for a ``datasets:`` mixture (with
    ``test_split_size``), else ``dataset_name`` (any name in the module docstring, ``dataset_streaming`` honoured);
    the eval split ``dataset_test_split`` only when ``eval_strategy`` is not ``no``."""
    from trl import get_dataset

    mixture = getattr(dataset_args, "datasets", None)
    if mixture:
        if script_args.dataset_name:
            import warnings

            warnings.warn("Both `datasets` and `dataset_name` are given: `datasets` is used.", stacklevel=2)
        dataset, source = get_dataset(dataset_args), "the `datasets` mixture"
    elif script_args.dataset_name:
        dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
        source = f"dataset_name {script_args.dataset_name!r}"
    else:
        raise ValueError("Either `datasets` (a mixture) or `dataset_name` must be provided.")
    train = split(dataset, script_args.dataset_train_split, source)
    if training_args.eval_strategy == "no":
        return train, None
    hint = " (set test_split_size with a `datasets` mixture, or dataset_test_split)"
    return train, split(dataset, script_args.dataset_test_split, f"{source} (evaluation){hint}")


PREFERENCE_COLUMNS = (("chosen", "rejected"),)
"""What TRL's DPOTrainer needs: ``prompt`` is optional (an implicit prompt is extracted from the pair)."""


def train_command(
    trainer_class, script_args, training_args, model_args, dataset_args, columns=None, **trainer_kwargs
) -> int:
    """What every training command does, as TRL's scripts do: data, a model path built by the trainer, the PEFT
    config from ``ModelConfig`` (unless the command gives its own), train, save.

    ``columns``: for TRL's own trainers, which fail on a missing column with a bare ``KeyError`` deep in
    ``datasets.map``, the column sets they accept (hf-align's trainers check their data themselves).
    """
    from trl import get_peft_config

    from hf_align.trainers._data_checks import check_dataset

    train, evaluation = load_training_data(script_args, dataset_args, training_args)
    if columns is not None:
        check_dataset(train, "train_dataset", columns)
        check_dataset(evaluation, "eval_dataset", columns)
    trainer_kwargs.setdefault("peft_config", get_peft_config(model_args))
    trainer = trainer_class(
        model=trainer_model(model_args, training_args),
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        **trainer_kwargs,
    )
    if script_args.ignore_bias_buffers:  # TRL's scripts' DDP work-around for boolean buffers
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    train_and_save(trainer, training_args, script_args)
    return 0


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
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()
