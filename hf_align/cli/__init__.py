"""``hf-align`` command line: ``hf-align <command> [--config recipe.yaml] [--field value ...]``.

One dispatcher, one registry: :data:`COMMANDS` (name → module under ``hf_align.cli``, one-line help) and the
training commands, one per entry of :data:`hf_align.trainers.registry.TRAINERS`. Every command parses dataclasses
with TRL's ``TrlParser`` (:class:`hf_align.cli.common.CommandParser`). A user's mistake (a bad field, a missing
file, an output that exists) is one line on stderr and exit code 2; ``hf-align --debug <command>`` (or
``HF_ALIGN_DEBUG=1``) shows the traceback instead, and a bug always does. The current folder is not on the import
path of a command (``python -m hf_align.cli`` would put it there): a ``module:function`` in a recipe is imported
from installed packages and ``PYTHONPATH`` only, whether the command runs in-process or under ``accelerate launch``.
"""

from __future__ import annotations

import importlib
import os
import sys

from hf_align.cli.errors import DEBUG_ENV, USER_ERRORS, run_guarded  # noqa: F401


COMMANDS: dict[str, tuple[str, str]] = {
    "env": (
        "env",
        "Print versions of hf-align, torch, TRL, PEFT, ... and CUDA/extras availability (for bug reports).",
    ),
    "quickstart": ("quickstart", "Align the embedded testbed model on CPU and print the reward before and after."),
    "eval": ("evaluate", "Evaluate a model: mean reward, win rate and KL vs a reference, retain perplexity, length."),
    "select-mask": ("select_mask", "Select a neuron mask from saved scores or from two checkpoints (ALLO's recipe)."),
    "label-tokens": ("label_tokens", "Add key-token weight columns to a preference/forget dataset."),
    "merge": ("merge", "Average base and aligned weights (linear or partwise AMA), streamed tensor by tensor."),
    "adaptive-merge": ("adaptive_merge", "Learn per-block averaging ratios on data (adaptive AMA), then merge."),
    "pipeline": ("pipeline", "Run a multi-stage recipe (ALLO: warm-up, masks, forget, improve); resumable."),
    "recipes": ("recipes", "List the shipped recipes; `--config NAME` (e.g. allo/improve_dpo) runs one by name."),
}
"""name -> (module under hf_align.cli with ``main(argv)``, one-line help); the training commands come from the
trainer registry (:func:`hf_align.cli.training.training_commands`)."""


def all_commands() -> dict[str, str]:
    """name → one-line help of every command."""
    from hf_align.cli.training import training_commands

    return {**{name: help_ for name, (_, help_) in COMMANDS.items()}, **training_commands(COMMANDS)}


def run_command(name: str, argv: list[str], launch: bool | None = None) -> int:
    """Run command ``name`` (exceptions propagate; :func:`run_guarded` turns user errors into one line), holding
    the locks of its outputs (:func:`hf_align.scripts.outputs.command_scope`) until it returns."""
    from hf_align.cli.common import find_config
    from hf_align.scripts.outputs import command_scope

    argv = find_config(argv)  # a recipe's name or a missing file fails here, before a command imports anything

    with command_scope():
        if name in COMMANDS:
            return int(importlib.import_module(f"hf_align.cli.{COMMANDS[name][0]}").main(argv) or 0)
        from hf_align.cli import training

        return training.run_command(name, argv, launch=launch)


def _usage() -> str:
    helps = all_commands()
    width = max(len(name) for name in helps)
    return "\n".join(
        [
            "usage: hf-align <command> [--config RECIPE.yaml] [--field value ...]",
            "",
            "Fine-grained alignment methods for the Hugging Face training stack.",
            "",
            "commands:",
            *(f"  {name:<{width}}  {help_}" for name, help_ in sorted(helps.items())),
            "",
            "options:",
            "  -h, --help     show this message and exit",
            "  -V, --version  print the hf-align version and exit",
            "  --debug        (before the command) show the traceback of an error instead of one line",
            "",
            "Run `hf-align <command> --help` for a command's fields. Every command takes `--config recipe.yaml`; the",
            "training commands take any `trl dpo` / `trl sft` recipe and run in this process unless an accelerate",
            "launch flag (`--num_processes`, `--config_file`, `--accelerate_config`) is given.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None and not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)  # `python -m hf_align.cli` puts the current folder first on sys.path; the console script not
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_ENV] = "1"  # inherited by the processes `accelerate launch` starts
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from hf_align import __version__

        print(f"hf-align {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in all_commands():
        print(f"hf-align: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_guarded(name, lambda: run_command(name, rest))


if __name__ == "__main__":
    sys.exit(main())
