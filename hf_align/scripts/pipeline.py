"""The pipeline engine behind ``hf-align pipeline``: run a multi-stage recipe (ALLO's four stages), resumably.

It runs command-line commands as stages, so it sits beside the trainers, below :mod:`hf_align.cli`: the dispatcher
hands it a :class:`Commands` (the names a stage may use, which of them train, how to run one).

A pipeline recipe lists stages; each runs one hf-align command with its own recipe and arguments, writing into
``<output_dir>/<stage name>``::

    # command: hf-align pipeline
    output_dir: outputs/allo
    model_name_or_path: meta-llama/Llama-2-7b-hf
    set: {bf16: true}                  # fields given to every training stage
    stages:
      - {name: warmup, command: warmup-dpo, recipe: warmup_dpo.yaml, args: {dataset_name: ...}}
      - {name: mask_improve, command: select-mask, args: {neuron_scores_path: "{warmup}", neuron_mask_ratio: 0.1}}
      - {name: improve, command: masked-dpo, recipe: improve_dpo.yaml,
         args: {model_name_or_path: "{model}", neuron_mask_path: "{mask_improve}"}}

``{stage}`` in an argument is that (earlier, or the same) stage's output folder, ``{model}`` the pipeline's model.
Training stages get ``--model_name_or_path {model}``, and every stage ``--output_dir``, unless their args say
otherwise (or give an ``output_file``). ``--set FIELD=VALUE`` reaches every training stage, ``--set STAGE.FIELD=VALUE`` one stage of any
command. A stage is complete only once ``pipeline_stage.json`` in its folder says so (written atomically after
the command returned), and that file keeps the stage's resolved arguments: re-running skips a completed stage whose
resolved arguments are unchanged, re-runs it from scratch (and every stage after it) when they changed, and resumes
an interrupted training stage from its last ``checkpoint-*`` (the last *complete* one, see
:mod:`hf_align.checkpoints`); ``--force`` re-runs every stage. A summary table ends the run, a failed one too.

The pipeline only ever removes a folder it wrote itself: an existing stage folder without its
``pipeline_stage.json`` is refused, naming it. ``output_dir`` is locked while a pipeline runs, with the lock every
command takes on its output (:func:`hf_align.io.output_lock`: ``.<output_dir name>.lock`` beside it, naming the
holder's pid); a lock left by a dead process is taken over with a warning. Each stage locks its own folder. The
permission flags the command line got (``--trust_remote_code`` / ``--allow_recipe_env``) are passed to every
training stage.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_align.checkpoints import last_complete_checkpoint
from hf_align.errors import UserError
from hf_align.io import output_lock, read_json, read_yaml, write_json


STAGE_FILE = "pipeline_stage.json"
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")
_STAGE_KEYS = {"name", "command", "recipe", "args"}
_PIPELINE_KEYS = {"output_dir", "model_name_or_path", "set", "stages"}


@dataclass(frozen=True)
class Commands:
    """What the engine needs from the command line's dispatcher (passed in: the engine never imports it)."""

    names: Collection[str]
    """Every command a stage may name."""
    training: Collection[str]
    """Those that train: they get the pipeline's model, ``set`` fields, permission flags and resume flags."""
    run: Callable[[str, list[str]], int]
    """Run command ``name`` with ``argv``; a user's error is printed as one line and returns a non-zero code."""


@dataclass
class Plan:
    """A checked pipeline recipe and what the command line added to it, before anything runs."""

    path: Path
    recipe: dict[str, Any]
    output_dir: Path
    model: str
    defaults: dict[str, str]
    overrides: dict[str, str]


class StageFailed(RuntimeError):
    """A stage's command returned a non-zero exit code (it printed its own error)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def load_pipeline(path: Path, commands: Collection[str]) -> dict[str, Any]:
    """Read and check a pipeline recipe whose stages name some of ``commands``; errors name the file, the stage and
    the key."""
    if not path.is_file():
        raise FileNotFoundError(f"Pipeline recipe {str(path)!r} does not exist.")
    recipe = read_yaml(path, "pipeline recipe")
    if not isinstance(recipe, dict):
        raise UserError(f"{str(path)!r}: a pipeline recipe is a YAML mapping with a `stages` list.")
    unknown = sorted(set(recipe) - _PIPELINE_KEYS)
    if unknown:
        raise UserError(f"{str(path)!r}: unknown key(s) {unknown}; expected some of {sorted(_PIPELINE_KEYS)}.")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{str(path)!r}: `stages` must be a non-empty list.")
    names: list[str] = []
    for index, stage in enumerate(stages):
        where = f"{str(path)!r}, stage {index}"
        if not isinstance(stage, dict) or "name" not in stage or "command" not in stage:
            raise UserError(f"{where}: each stage needs `name` and `command`.")
        unknown = sorted(set(stage) - _STAGE_KEYS)
        if unknown:
            raise UserError(f"{where} ({stage['name']}): unknown key(s) {unknown}; expected {sorted(_STAGE_KEYS)}.")
        if stage["command"] not in commands:
            raise UserError(f"{where} ({stage['name']}): unknown command {stage['command']!r}.")
        if stage["command"] == "pipeline":
            raise UserError(f"{where} ({stage['name']}): a pipeline cannot run a pipeline.")
        if stage["name"] in names or not re.fullmatch(r"[A-Za-z0-9_-]+", str(stage["name"])):
            raise UserError(f"{where}: stage name {stage['name']!r} must be unique and use [A-Za-z0-9_-].")
        for value in (stage.get("args") or {}).values():
            for ref in PLACEHOLDER.findall(str(value)):
                if ref not in names and ref not in ("model", "output_dir", stage["name"]):
                    raise UserError(
                        f"{where} ({stage['name']}): {{{ref}}} does not name an earlier stage (have {names})."
                    )
        if stage.get("recipe") and not (path.parent / stage["recipe"]).is_file():
            raise FileNotFoundError(f"{where} ({stage['name']}): recipe {stage['recipe']!r} not found next to it.")
        names.append(stage["name"])
    return recipe


def _as_flag_value(value: Any) -> str:
    """A recipe value as the command line gives it: a mapping or a list as JSON (what TrainingArguments' dict
    fields parse; Python's repr is not JSON), anything else as its text."""
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _substitute(value: Any, outputs: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: outputs[m.group(1)], _as_flag_value(value))


def _flag_args(args: dict[str, Any], outputs: dict[str, str]) -> list[str]:
    argv: list[str] = []
    for key, value in args.items():
        if isinstance(value, list):
            argv += [f"--{key}", *(_substitute(v, outputs) for v in value)]
        else:
            argv += [f"--{key}", _substitute(value, outputs)]
    return argv


def _check_ours(directory: Path) -> None:
    """A stage folder that exists with content but without our marker belongs to someone else: refuse."""
    if directory.is_dir() and any(directory.iterdir()) and not (directory / STAGE_FILE).exists():
        raise FileExistsError(
            f"{str(directory)!r} exists and was not written by the pipeline (no {STAGE_FILE}); move it away or "
            "choose another --output_dir."
        )
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{str(directory)!r} exists and is not a folder; choose another --output_dir.")


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
    stage: dict,
    recipe_dir: Path,
    outputs: dict[str, str],
    defaults: dict[str, str],
    overrides: dict[str, str],
    training: bool = False,
) -> list[str]:
    """The resolved command line of one stage (without resume flags).

    Training stages: the recipe's ``set`` < the stage's ``args`` < ``--set`` on the command line.
    """
    args = dict(stage.get("args") or {})
    prefix = f"{stage['name']}."
    own = {key.removeprefix(prefix): value for key, value in overrides.items() if key.startswith(prefix)}
    if training:
        common = {key: value for key, value in overrides.items() if "." not in key}
        args = {**defaults, **args, **common, **own}
        args.setdefault("model_name_or_path", "{model}")
    else:
        args.update(own)
    if not {"output_dir", "output_file", "output"} & set(args):
        args["output_dir"] = outputs[stage["name"]]
    argv = ["--config", str(recipe_dir / stage["recipe"])] if stage.get("recipe") else []
    return argv + _flag_args(args, outputs)


def run_stage(stage: dict, argv: list[str], run: Callable[[str, list[str]], int]) -> None:
    """Run one stage's command (``run``: :attr:`Commands.run`, which prints its errors), then :class:`StageFailed`."""
    code = run(stage["command"], argv)
    if code:
        raise StageFailed(f"stage {stage['name']!r} ({stage['command']}) failed with exit code {code}.", int(code))


def plan(
    path: Path, commands: Collection[str], output_dir: str | None, model: str | None, set_items: list[str]
) -> Plan:
    """Check the recipe at ``path`` and what the command line adds (``--output_dir``, ``--model_name_or_path``,
    ``--set`` items), before anything runs."""
    recipe = load_pipeline(path, commands)
    model = model or recipe.get("model_name_or_path")
    if model is None:
        raise UserError(f"{str(path)!r}: give model_name_or_path in the recipe or on the command line.")
    defaults = {k: _as_flag_value(v) for k, v in (recipe.get("set") or {}).items()}
    overrides: dict[str, str] = {}
    for item in set_items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}.")
        overrides[key] = value
    output_dir = Path(output_dir or recipe.get("output_dir") or "outputs/pipeline")
    return Plan(path, recipe, output_dir, str(model), defaults, overrides)


def run_pipeline(plan: Plan, commands: Commands, flags: list[str], force: bool) -> list[dict]:
    """Run (or skip, or resume) every stage under ``plan.output_dir``'s lock; print the summary, on failure too.
    ``flags``: the permission flags the command line got, passed to every training stage."""
    output_dir = plan.output_dir
    outputs = {"model": plan.model, "output_dir": str(output_dir)}
    outputs.update({stage["name"]: str(output_dir / stage["name"]) for stage in plan.recipe["stages"]})
    output_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(output_dir, "hf-align pipeline"):
        for stage in plan.recipe["stages"]:  # before anything runs: refuse folders someone else made
            _check_ours(output_dir / stage["name"])
        summary: list[dict] = []
        try:
            _run_stages(plan, outputs, commands, flags, force, summary)
        except BaseException:
            _print_summary(summary)  # what finished, and which stage failed
            raise
    _print_summary(summary)
    return summary


def _run_stages(
    plan: Plan, outputs: dict[str, str], commands: Commands, flags: list[str], force: bool, summary: list[dict]
) -> None:
    """Run (or skip) each stage in order, appending its summary row to ``summary`` as soon as it is known."""
    rerun_rest = force  # once a stage re-runs, the stages after it read new inputs: they re-run too
    for stage in plan.recipe["stages"]:
        directory = Path(outputs[stage["name"]])
        marker = directory / STAGE_FILE
        done = read_json(marker) if marker.exists() else {}
        training = stage["command"] in commands.training
        resolved = stage_argv(stage, plan.path.parent, outputs, plan.defaults, plan.overrides, training)
        changed = done.get("resolved_args", resolved) != resolved
        if done.get("status") == "complete" and not (changed or rerun_rest):
            metric = done.get("metric") or _metric(directory)
            summary.append(_row(stage, "skipped (complete)", 0.0, directory, metric))
            continue
        if done and (changed or rerun_rest):
            why = "--force" if force else "its arguments changed" if changed else "an earlier stage re-ran"
            print(f"[pipeline] {stage['name']}: re-running from scratch ({why}).", flush=True)
            shutil.rmtree(directory)  # ours (_check_ours): a stale result or a run with other arguments
        rerun_rest = True
        argv = list(resolved)
        checkpoint = last_complete_checkpoint(directory) if training and directory.exists() else None
        if training:
            argv += flags
        if checkpoint is not None:
            argv += ["--resume_from_checkpoint", str(checkpoint)]
        elif directory.exists() and not training:
            shutil.rmtree(directory)  # our own half-written selection or labelling (_check_ours): redo it
        record = {"name": stage["name"], "command": stage["command"], "argv": argv, "status": "running"}
        record["resolved_args"] = resolved  # what a re-run compares against (without resume and permission flags)
        write_json(marker, record)
        print(f"[pipeline] {stage['name']}: hf-align {stage['command']} {' '.join(argv)}", flush=True)
        start = time.time()
        try:
            run_stage(stage, argv, commands.run)
        except BaseException:
            summary.append(_row(stage, "FAILED", time.time() - start, directory, "-"))
            raise
        seconds, metric = time.time() - start, _metric(directory)
        write_json(marker, {**record, "status": "complete", "seconds": seconds, "metric": metric})
        status = f"resumed from {checkpoint.name}" if checkpoint is not None else "ran"
        summary.append(_row(stage, status, seconds, directory, metric))


def _row(stage: dict, status: str, seconds: float, directory: Path, metric: str) -> dict:
    return {"stage": stage["name"], "status": status, "seconds": seconds, "dir": directory, "metric": metric}


def _print_summary(rows: list[dict]) -> None:
    header = ("stage", "status", "time", "output", "metric")
    table = [(r["stage"], r["status"], f"{r['seconds']:.0f}s", str(r["dir"]), r["metric"]) for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in (header, *table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
