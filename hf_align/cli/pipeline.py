"""``hf-align pipeline --config recipe.yaml``: run a multi-stage recipe (ALLO's four stages) as one resumable command.

The recipe format, resume and locking are the engine's (:mod:`hf_align.scripts.pipeline`); this command parses its flags
and refuses what the recipe may not switch on: ``trust_remote_code`` or ``allow_recipe_env`` in the pipeline
recipe's ``set``/``args`` is refused unless the pipeline itself got ``--trust_remote_code`` / ``--allow_recipe_env``,
which it then passes to every training stage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from hf_align.cli.common import ALLOW_RECIPE_ENV, TRUST_REMOTE_CODE, check_permissions
from hf_align.config_checks import CheckedConfig, option
from hf_align.errors import UserError
from hf_align.scripts import pipeline as engine


@dataclass
class PipelineArguments(CheckedConfig):
    """What the command line adds to the pipeline recipe (``--config``: the recipe itself, stages and all)."""

    output_dir: str | None = option(None, help="Overrides the recipe's output_dir.")
    model_name_or_path: str | None = option(None, help="Overrides the recipe's model_name_or_path.")
    set: list[str] = option(
        help="FIELD=VALUE for every training stage, or STAGE.FIELD=VALUE for one stage, e.g. --set max_steps=2 labels.max_rows=8.",
        default_factory=list,
    )
    force: bool = option(False, help="Re-run every stage, even completed ones with unchanged arguments.")
    allow_recipe_env: bool = option(False, help="Let the stage recipes' `env:` set environment variables.")
    trust_remote_code: bool = option(False, help="Let stages load models whose folder ships Python code.")
    recipe: str | None = option(None, help="The pipeline recipe: the --config file.", init=False)


def parse(argv: list[str]) -> PipelineArguments:
    """The flags; ``--config`` (or, deprecated, a first positional argument) names the pipeline recipe."""
    from hf_align.cli.common import parse_command

    argv, recipe = list(argv), None
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        recipe = argv.pop(argv.index("--config") + 1)
        argv.remove("--config")
    elif argv and not argv[0].startswith("-"):
        recipe = argv.pop(0)
        print(
            "FutureWarning: hf-align pipeline: the recipe as a positional argument is deprecated, use --config "
            f"{recipe} instead (the old spelling goes in the next release).",
            file=sys.stderr,
        )
    (args,) = parse_command("hf-align pipeline", (PipelineArguments,), argv, description=__doc__)
    if recipe is None:
        raise UserError("--config (the pipeline recipe, e.g. recipes/allo/pipeline.yaml) is required.")
    from hf_align.scripts.recipes import find_recipe

    args.recipe = str(find_recipe(recipe))
    return args


def stage_commands() -> engine.Commands:
    """The dispatcher's commands for the engine: stages run in this process, their errors printed as one line."""
    from hf_align.cli import COMMANDS, all_commands, run_command
    from hf_align.cli.errors import run_guarded

    names = set(all_commands())
    return engine.Commands(
        names=names,
        training=names - set(COMMANDS),
        run=lambda name, argv: run_guarded(name, lambda: run_command(name, argv, launch=None)),
    )


def _check_recipe_permissions(plan: engine.Plan, flags: set[str]) -> None:
    """``set``, each stage's ``args`` (from a file) and ``--set`` (which reaches a stage's command line as any field
    does) cannot switch on what needs the pipeline's own flag: a stage would read ``--trust_remote_code t`` as it."""
    from hf_align import trust

    sources = [(f"{str(plan.path)!r}, set", plan.recipe.get("set") or {})]
    sources += [(f"{str(plan.path)!r}, stage {s['name']!r} args", s.get("args") or {}) for s in plan.recipe["stages"]]
    sources.append(("--set", {key.rpartition(".")[2]: value for key, value in plan.overrides.items()}))
    for where, args in sources:
        if "allow_recipe_env" in args and ALLOW_RECIPE_ENV not in flags:
            check_permissions([("allow_recipe_env", ALLOW_RECIPE_ENV)], where)
        trust.check_code_requests(args, TRUST_REMOTE_CODE in flags, where)


def run(args: PipelineArguments) -> list[dict]:
    from hf_align.scripts.outputs import guard_outputs

    commands = stage_commands()
    plan = engine.plan(Path(args.recipe), commands.names, args.output_dir, args.model_name_or_path, args.set)
    flags = {flag for flag in (ALLOW_RECIPE_ENV, TRUST_REMOTE_CODE) if getattr(args, flag.lstrip("-"))}
    _check_recipe_permissions(plan, flags)
    model = {"--model_name_or_path": plan.model} if plan.model != "testbed" else {}
    guard_outputs((), "pipeline", outputs={"--output_dir": plan.output_dir}, inputs=model)
    return engine.run_pipeline(plan, commands, sorted(flags), args.force)


def main(argv: list[str] | None = None) -> int:
    """Errors in the recipe surface through ``hf_align.cli.run_guarded`` (one line, exit code 2)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except engine.StageFailed as err:  # the stage printed its own error; say which stage it was
        print(f"hf-align pipeline: {err}", file=sys.stderr, flush=True)
        return err.code
    return 0
