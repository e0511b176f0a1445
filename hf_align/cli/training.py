"""Training commands: parse with TRL's ``TrlParser`` (YAML + overrides), then run, in this process by default.

``hf-align <command> --config recipe.yaml [--field value ...] [--num_processes N] [--config_file ds.yaml]``

The recipe is parsed once (unknown fields and wrong types fail before anything is loaded). Without a launch flag
(any ``accelerate launch`` flag, e.g. ``--num_processes``, ``--config_file``, or TRL's ``--accelerate_config``) the
command's ``run`` function runs right here: one Python, one TRL import, one traceback-free error line. With one,
the same arguments go to ``accelerate launch -m hf_align.cli.training <command> ...`` and each launched process
parses again and runs ``run``. ``HF_ALIGN_NO_LAUNCH=1`` (or the old ``--no_launch``) runs in this process even
when a launch flag is given.

Two things a recipe cannot switch on by itself, because a recipe is a file someone may have sent you: its
``env:`` mapping (TRL's ``TrlParser`` copies it into ``os.environ``, so ``PYTHONPATH`` could make every
process import a ``sitecustomize.py``) needs ``--allow_recipe_env``, and ``trust_remote_code: true`` (also inside
``model_init_kwargs``) needs ``--trust_remote_code``, both given on the command line. ``module:function`` names
in a recipe (``reward_funcs``, ``feedback_fn``) are imported from the installed packages and ``PYTHONPATH``
only: the current folder is never put on the import path, in-process or in the launched processes.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainingCommand:
    """A training command: where its ``make_parser``/``run`` live."""

    name: str
    module: str  # module under hf_align.cli exposing make_parser(prog, command) and run(*parsed, command)
    help: str


TRAINING_COMMANDS: dict[str, TrainingCommand] = {
    command.name: command
    for command in (
        TrainingCommand(
            "masked-dpo",
            "train_masked_dpo",
            "DPO that updates only selected neurons, with token weights (ALLO's improving stage).",
        ),
        TrainingCommand(
            "warmup-dpo",
            "train_warmup_dpo",
            "DPO with MaskAccumulationCallback: find the neurons alignment uses (ALLO stage 1).",
        ),
        TrainingCommand(
            "npo",
            "train_npo",
            "Negative preference optimization: forget completions (sequence- or token-level, masked).",
        ),
        TrainingCommand(
            "feedback",
            "train_feedback",
            "Feedback-conditioned training (ALT / Quark): sample, score, pool, train on feedback.",
        ),
        TrainingCommand(
            "aligner-sft", "train_aligner", "SFT with an Aligner adapter (N global tokens shared by all layers)."
        ),
        TrainingCommand("aligner-dpo", "train_aligner", "DPO with an Aligner adapter (reference = adapter disabled)."),
    )
}


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence`` (the launcher's own flags)."""
    remaining, it = [], iter(subsequence)
    current = next(it, None)
    for item in items:
        if current is not None and item == current:
            current = next(it, None)
        else:
            remaining.append(item)
    return remaining


def _load(name: str):
    return importlib.import_module(f"hf_align.cli.{TRAINING_COMMANDS[name].module}")


HELP_FLAGS = ("-h", "--help")


def _help_cache_file(name: str) -> Path:
    """Where ``name``'s help is kept, keyed by the versions of the packages that define its fields and by hf-align's
    own sources (their sizes and modification times), so any change builds it afresh."""
    import hashlib
    import importlib.metadata

    import hf_align

    key = [hf_align.__version__, name]
    for package in ("trl", "transformers", "accelerate", "peft"):
        try:
            key.append(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            key.append("-")
    for source in sorted(Path(hf_align.__file__).parent.rglob("*.py")):
        stat = source.stat()
        key.append(f"{source.name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:16]
    root = Path(os.environ.get("HF_ALIGN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "hf_align")
    return root.expanduser() / "help" / f"{name}-{digest}.txt"


def help_text(name: str) -> str:
    """``hf-align <name> --help``: building it imports torch, transformers and TRL (seconds), so after the first time
    it comes from a small cache file, without importing them; a cache that cannot be written is skipped."""
    cache = _help_cache_file(name)
    if cache.is_file():
        return cache.read_text()
    text = _load(name).make_parser(prog=f"hf-align {name}", command=name).format_help()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        os.replace(partial, cache)
    except OSError:
        pass
    return text


def parse(name: str, argv: list[str]):
    """Parse ``argv`` for command ``name``; returns (dataclasses..., config_remaining, cli_remaining)."""
    module = _load(name)
    parser = module.make_parser(prog=f"hf-align {name}", command=name)
    return parser.parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)


def _launch_flags() -> set[str]:
    """Every ``accelerate launch`` option (and TRL's ``--accelerate_config``): what starts a launch."""
    from accelerate.commands.launch import launch_command_parser

    launcher = launch_command_parser()
    flags = {opt for action in launcher._actions for opt in action.option_strings if opt.startswith("--")}
    return (flags - {"--help"}) | {"--accelerate_config"}


def _launch_args_given(remaining: list[str]) -> bool:
    flags = _launch_flags()
    return any(arg.split("=")[0] in flags for arg in remaining if arg.startswith("--"))


def _fail_on_unknown(name: str, config_remaining: list[str], cli_remaining: list[str]) -> None:
    """Unknown recipe fields are errors (a typo must not silently fall back to a default)."""
    from hf_align.cli.common import TRUST_REMOTE_CODE

    known_launch = _launch_flags() | {TRUST_REMOTE_CODE}
    unknown = [arg for arg in config_remaining if arg.startswith("--") and arg.split("=")[0] not in known_launch]
    if unknown:
        fields = ", ".join(arg.lstrip("-").split("=")[0] for arg in unknown)
        raise SystemExit(
            f"hf-align {name}: unknown field(s) in the recipe: {fields}. Check the spelling against "
            f"`hf-align {name} --help`."
        )
    unknown_cli = [arg for arg in cli_remaining if arg.startswith("--") and arg.split("=")[0] not in known_launch]
    if unknown_cli:
        raise SystemExit(f"hf-align {name}: unrecognized argument(s): {' '.join(unknown_cli)}")


def _resolve_resume(parsed: list) -> None:
    """``resume_from_checkpoint`` → the last *complete* checkpoint (or refused), before any model is loaded."""
    from hf_align.checkpoints import resolve_resume_checkpoint

    for args in parsed:
        if hasattr(args, "resume_from_checkpoint") and hasattr(args, "output_dir"):
            args.resume_from_checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)


def run_command(name: str, argv: list[str], launch: bool | None = None) -> int:
    """Validate, then run in-process or through ``accelerate launch`` (``launch=None``: when a launch flag is given)."""
    *parsed, config_remaining, cli_remaining = parse(name, argv)  # checks the recipe's permissions first
    _fail_on_unknown(name, config_remaining, cli_remaining)
    _resolve_resume(parsed)
    no_launch = "--no_launch" in argv or os.environ.get("HF_ALIGN_NO_LAUNCH") == "1"
    if launch is None:
        launch = not no_launch and _launch_args_given(config_remaining + cli_remaining)
    if not launch:
        return int(_load(name).run(*parsed, command=name) or 0)

    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from hf_align.cli.common import TRUST_REMOTE_CODE

    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    # --trust_remote_code stays on the launched processes' command line (they check the recipe again)
    script_args = _subtract_subsequence(argv, [a for a in cli_remaining if a.split("=")[0] != TRUST_REMOTE_CODE])
    accelerate_args = launch_command_parser().parse_args(
        [*launch_args, "-m", "hf_align.cli.training", name, *script_args, "--no_launch"]
    )
    if _needs_cpu_processes(accelerate_args):
        # accelerate's CPU path starts ONE process without an MPI hostfile; its torchrun path starts them all, and
        # each one joins a gloo group when its TrainingArguments ask for the CPU.
        accelerate_args.multi_gpu, accelerate_args.cpu = True, False
        if not any(args.use_cpu for args in parsed if hasattr(args, "use_cpu")):
            accelerate_args.training_script_args += ["--use_cpu", "true"]
        print(
            f"[hf-align] no GPU: {accelerate_args.num_processes} CPU processes (torch.distributed, gloo)", flush=True
        )
    import subprocess

    safe_path = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"  # `python -m` in each process must not put the current folder on sys.path
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as err:  # the process already printed its one-line error
        return err.returncode or 1
    finally:
        if safe_path is None:
            os.environ.pop("PYTHONSAFEPATH")
        else:
            os.environ["PYTHONSAFEPATH"] = safe_path
    return 0


def _needs_cpu_processes(accelerate_args) -> bool:
    """``--num_processes N`` (N > 1) on a machine without accelerators and without a launcher choice of its own."""
    import torch

    if (accelerate_args.num_processes or 1) < 2:
        return False
    own_choice = ("multi_gpu", "use_deepspeed", "use_fsdp", "use_megatron_lm", "tpu", "config_file", "mpirun_hostfile")
    if any(getattr(accelerate_args, flag, None) for flag in own_choice):
        return False
    backends = (torch.cuda, getattr(torch, "xpu", None), getattr(torch, "npu", None))
    return not any(b is not None and b.is_available() for b in backends) and not torch.backends.mps.is_available()


if __name__ == "__main__":  # entry point inside each process started by `accelerate launch`
    from hf_align.cli.errors import quiet_optional_kernel_notice, run_guarded

    quiet_optional_kernel_notice()
    command, *rest = sys.argv[1:]
    sys.exit(run_guarded(command, lambda: run_command(command, rest, launch=False)))
