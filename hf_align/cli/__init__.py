"""``hf-align`` command line: ``hf-align <command> [--config recipe.yaml] [--field value ...]``.

Each command lives in its own module under ``hf_align.cli`` with a ``main(argv)`` function and is
listed in :data:`COMMANDS`; this module only dispatches, and turns a user's mistake (a bad field, a missing
file, an output that exists) into one line on stderr and exit code 2; ``hf-align --debug <command>`` (or
``HF_ALIGN_DEBUG=1``) shows the traceback instead. The current folder is not on the import path of a command
(``python -m hf_align.cli`` would put it there): a ``module:function`` in a recipe is imported from installed
packages and ``PYTHONPATH`` only, whether the command runs in-process or under ``accelerate launch``.
"""

from __future__ import annotations

import importlib
import os
import sys

from hf_align.cli.errors import DEBUG_ENV, USER_ERRORS, quiet_optional_kernel_notice, run_guarded  # noqa: F401


# name -> (module under hf_align.cli, one-line help)
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
}


def _all_help() -> dict[str, str]:
    from hf_align.cli.training import TRAINING_COMMANDS

    return {
        **{name: help_ for name, (_, help_) in COMMANDS.items()},
        **{name: command.help for name, command in TRAINING_COMMANDS.items()},
    }


def _usage() -> str:
    helps = _all_help()
    width = max(len(name) for name in helps)
    lines = [
        "usage: hf-align <command> [options]",
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
        "Run `hf-align <command> --help` for a command's options. Training commands take `--config recipe.yaml`",
        "(any `trl dpo` / `trl sft` recipe) plus any field as `--field value`, and run in this process unless an",
        "accelerate launch flag (`--num_processes`, `--config_file`, `--accelerate_config`) is given.",
    ]
    return "\n".join(lines)


def _drop_implicit_cwd() -> None:
    """``python -m hf_align.cli`` puts the current folder first on ``sys.path``; the console script does not."""
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)


def main(argv: list[str] | None = None) -> int:
    quiet_optional_kernel_notice()
    if argv is None:
        _drop_implicit_cwd()
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
    from hf_align.cli.training import HELP_FLAGS, TRAINING_COMMANDS, help_text, run_command

    if name in TRAINING_COMMANDS and any(arg in HELP_FLAGS for arg in rest):
        print(help_text(name), end="")
        return 0
    if name in TRAINING_COMMANDS:
        return run_guarded(name, lambda: run_command(name, rest))
    if name not in COMMANDS:
        print(f"hf-align: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"hf_align.cli.{COMMANDS[name][0]}")
    return run_guarded(name, lambda: module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
