"""``hf-align pipeline recipe.yaml``: run a multi-stage recipe (ALLO's four stages) as one resumable command.

A pipeline recipe lists stages; each runs one hf-align command with its own recipe and arguments, writing into
``<output_dir>/<stage name>``::

    # command: hf-align pipeline
    output_dir: outputs/allo
    model_name_or_path: meta-llama/Llama-2-7b-hf
    set: {bf16: true}                  # fields given to every training stage
    stages:
      - {name: warmup, command: warmup-dpo, recipe: warmup_dpo.yaml, args: {dataset_name: ...}}
      - {name: mask_improve, command: select-mask, args: {scores: "{warmup}", ratio: 0.1}}
      - {name: improve, command: masked-dpo, recipe: improve_dpo.yaml,
         args: {model_name_or_path: "{model}", neuron_mask_path: "{mask_improve}"}}

``{stage}`` in an argument is that (earlier, or the same) stage's output folder, ``{model}`` the pipeline's model. Training stages get
``--model_name_or_path {model}`` and ``--output_dir`` unless their args say otherwise; other commands get
``--output``. A stage is complete only once ``pipeline_stage.json`` in its folder says so (written atomically after
the command returned): re-running skips completed stages and resumes an interrupted training stage from its last
``checkpoint-*``. Each stage folder keeps its resolved command line in that file. A summary table ends the run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from hf_align.io import read_json, write_json


STAGE_FILE = "pipeline_stage.json"
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")
_STAGE_KEYS = {"name", "command", "recipe", "args"}
_PIPELINE_KEYS = {"output_dir", "model_name_or_path", "set", "stages"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-align pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="Pipeline recipe (YAML), e.g. recipes/allo/pipeline.yaml.")
    parser.add_argument("--output_dir", help="Overrides the recipe's output_dir.")
    parser.add_argument("--model_name_or_path", help="Overrides the recipe's model_name_or_path.")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Give FIELD=VALUE to every training stage (repeatable), e.g. --set max_steps=2.",
    )
    parser.add_argument("--no_launch", action="store_true", help="Run training stages in this process.")
    return parser


def load_pipeline(path: Path) -> dict[str, Any]:
    """Read and check a pipeline recipe; errors name the file, the stage and the key."""
    if not path.is_file():
        raise FileNotFoundError(f"Pipeline recipe {str(path)!r} does not exist.")
    recipe = yaml.safe_load(path.read_text())
    if not isinstance(recipe, dict):
        raise ValueError(f"{str(path)!r}: a pipeline recipe is a YAML mapping with a `stages` list.")
    unknown = sorted(set(recipe) - _PIPELINE_KEYS)
    if unknown:
        raise ValueError(f"{str(path)!r}: unknown key(s) {unknown}; expected some of {sorted(_PIPELINE_KEYS)}.")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{str(path)!r}: `stages` must be a non-empty list.")
    from hf_align.cli import COMMANDS
    from hf_align.cli.training import TRAINING_COMMANDS

    names: list[str] = []
    for index, stage in enumerate(stages):
        where = f"{str(path)!r}, stage {index}"
        if not isinstance(stage, dict) or "name" not in stage or "command" not in stage:
            raise ValueError(f"{where}: each stage needs `name` and `command`.")
        unknown = sorted(set(stage) - _STAGE_KEYS)
        if unknown:
            raise ValueError(f"{where} ({stage['name']}): unknown key(s) {unknown}; expected {sorted(_STAGE_KEYS)}.")
        if stage["command"] not in TRAINING_COMMANDS and stage["command"] not in COMMANDS:
            raise ValueError(f"{where} ({stage['name']}): unknown command {stage['command']!r}.")
        if stage["command"] == "pipeline":
            raise ValueError(f"{where} ({stage['name']}): a pipeline cannot run a pipeline.")
        if stage["name"] in names or not re.fullmatch(r"[A-Za-z0-9_-]+", str(stage["name"])):
            raise ValueError(f"{where}: stage name {stage['name']!r} must be unique and use [A-Za-z0-9_-].")
        for value in (stage.get("args") or {}).values():
            for ref in PLACEHOLDER.findall(str(value)):
                if ref not in names and ref not in ("model", "output_dir", stage["name"]):
                    raise ValueError(
                        f"{where} ({stage['name']}): {{{ref}}} does not name an earlier stage (have {names})."
                    )
        if stage.get("recipe") and not (path.parent / stage["recipe"]).is_file():
            raise FileNotFoundError(f"{where} ({stage['name']}): recipe {stage['recipe']!r} not found next to it.")
        names.append(stage["name"])
    return recipe


def _substitute(value: Any, outputs: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: outputs[m.group(1)], str(value))


def _flag_args(args: dict[str, Any], outputs: dict[str, str], training: bool) -> list[str]:
    argv: list[str] = []
    for key, value in args.items():
        if not training and isinstance(value, bool):  # argparse switches
            argv += [f"--{key}"] if value else []
            continue
        if isinstance(value, list):
            argv += [f"--{key}", *(_substitute(v, outputs) for v in value)]
        else:
            argv += [f"--{key}", _substitute(value, outputs)]
    return argv


def _latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = [p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _metric(directory: Path) -> str:
    state = directory / "trainer_state.json"
    if state.exists():
        losses = [e["train_loss"] for e in read_json(state).get("log_history", []) if "train_loss" in e]
        if losses:
            return f"train_loss={losses[-1]:.4f}"
    mask = directory / "neuron_mask.json"
    if mask.exists():
        return f"mask ratio={read_json(mask)['ratio']:.4f}"
    return "-"


def stage_argv(
    stage: dict, recipe_dir: Path, outputs: dict[str, str], defaults: dict[str, str], overrides: dict[str, str]
) -> list[str]:
    """The resolved command line of one stage (without resume flags).

    Training stages: the recipe's ``set`` < the stage's ``args`` < ``--set`` on the command line.
    """
    from hf_align.cli.training import TRAINING_COMMANDS

    training = stage["command"] in TRAINING_COMMANDS
    args = dict(stage.get("args") or {})
    if training:
        args = {**defaults, **args, **overrides}
        args.setdefault("model_name_or_path", "{model}")
        args.setdefault("output_dir", outputs[stage["name"]])
    else:
        args.setdefault("output", outputs[stage["name"]])
    argv = ["--config", str(recipe_dir / stage["recipe"])] if stage.get("recipe") else []
    return argv + _flag_args(args, outputs, training)


def run_stage(stage: dict, argv: list[str], launch: bool | None) -> None:
    from hf_align.cli.training import TRAINING_COMMANDS, run_command

    if stage["command"] in TRAINING_COMMANDS:
        code = run_command(stage["command"], argv, launch=launch)
    else:
        import importlib

        from hf_align.cli import COMMANDS

        code = importlib.import_module(f"hf_align.cli.{COMMANDS[stage['command']][0]}").main(argv)
    if code:
        raise RuntimeError(f"Stage {stage['name']!r} ({stage['command']}) failed with exit code {code}.")


def run(args: argparse.Namespace) -> list[dict]:
    path = Path(args.recipe)
    recipe = load_pipeline(path)
    output_dir = Path(args.output_dir or recipe.get("output_dir") or "outputs/pipeline")
    model = args.model_name_or_path or recipe.get("model_name_or_path")
    if model is None:
        raise ValueError(f"{str(path)!r}: give model_name_or_path in the recipe or on the command line.")
    defaults = {k: str(v) for k, v in (recipe.get("set") or {}).items()}
    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}.")
        overrides[key] = value
    outputs = {"model": str(model), "output_dir": str(output_dir)}
    outputs.update({stage["name"]: str(output_dir / stage["name"]) for stage in recipe["stages"]})
    from hf_align.cli.training import TRAINING_COMMANDS

    summary = []
    for stage in recipe["stages"]:
        directory = output_dir / stage["name"]
        marker = directory / STAGE_FILE
        done = read_json(marker) if marker.exists() else {}
        if done.get("status") == "complete":
            metric = done.get("metric") or _metric(directory)
            summary.append(_row(stage, "skipped (complete)", 0.0, directory, metric))
            continue
        argv = stage_argv(stage, path.parent, outputs, defaults, overrides)
        training = stage["command"] in TRAINING_COMMANDS
        checkpoint = _latest_checkpoint(directory) if training and directory.exists() else None
        if checkpoint is not None:
            argv += ["--resume_from_checkpoint", str(checkpoint)]
        elif directory.exists() and not training:
            shutil.rmtree(directory)  # a half-written selection or labelling: redo it from scratch
        record = {"name": stage["name"], "command": stage["command"], "argv": argv, "status": "running"}
        write_json(marker, record)
        print(f"[pipeline] {stage['name']}: hf-align {stage['command']} {' '.join(argv)}", flush=True)
        start = time.time()
        run_stage(stage, argv, launch=False if args.no_launch else None)
        seconds, metric = time.time() - start, _metric(directory)
        write_json(marker, {**record, "status": "complete", "seconds": seconds, "metric": metric})
        status = f"resumed from {checkpoint.name}" if checkpoint is not None else "ran"
        summary.append(_row(stage, status, seconds, directory, metric))
    _print_summary(summary)
    return summary


def _row(stage: dict, status: str, seconds: float, directory: Path, metric: str) -> dict:
    return {"stage": stage["name"], "status": status, "seconds": seconds, "dir": directory, "metric": metric}


def _print_summary(rows: list[dict]) -> None:
    header = ("stage", "status", "time", "output", "metric")
    table = [(r["stage"], r["status"], f"{r['seconds']:.0f}s", str(r["dir"]), r["metric"]) for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in (header, *table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"hf-align pipeline: {err}", flush=True)
        return 2
    return 0
