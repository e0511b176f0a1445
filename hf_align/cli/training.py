"""Training commands, one per entry of :data:`hf_align.trainers.registry.TRAINERS`, parsed as ``trl dpo`` parses.

``hf-align <command> --config recipe.yaml [--field value ...] [--num_processes N] [--config_file ds.yaml]``

Each command parses what TRL's scripts parse (``ScriptArguments``, the trainer's config, ``ModelConfig``,
``DatasetMixtureConfig``) plus its own dataclasses, so every ``trl dpo`` / ``trl sft`` recipe runs here. The recipe
is parsed once (unknown fields and wrong types fail before anything is loaded). Without a launch flag (any
``accelerate launch`` flag, or TRL's ``--accelerate_config``) the command runs in this process; with one, TRL's
launcher (``trl.cli.accelerate_launcher``) starts this file under ``accelerate launch`` and each process parses
again and runs. ``HF_ALIGN_NO_LAUNCH=1`` runs in this process even when a launch flag is given. ``module:function``
names in a recipe are imported from the installed packages and ``PYTHONPATH`` only: the launched processes run with
``PYTHONSAFEPATH=1``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hf_align.config_checks import CheckedConfig, option


LAUNCH_HELP = """launch flags (without one, the command runs in this process):
  --num_processes N         Start N processes through `accelerate launch` (no GPU: torch.distributed, gloo).
  --config_file FILE        An accelerate config (DeepSpeed, FSDP, multi-GPU).
  --accelerate_config NAME  TRL's shipped accelerate configs by name (zero2, zero3, fsdp2, ...) or a file path.
  --multi_gpu, ...          Any other `accelerate launch` flag (see `accelerate launch -h`)."""


@dataclass
class NPODataArguments(CheckedConfig):
    """Where npo's retain data comes from (the forget data is TRL's ``dataset_name``)."""

    retain_dataset_name: str | None = option(
        None,
        help="Data to keep while forgetting (prompt-completion or language modeling): a Hub id, a folder, a data file or `testbed:retain`. Enables NPOConfig's retain term (retain_loss_type, retain_weight).",
    )
    retain_dataset_config: str | None = option(None, help="Configuration of the retain data.")
    retain_dataset_split: str = option("train", help="Split of retain_dataset_name to use.")


@dataclass
class AlignerArguments(CheckedConfig):
    """The Aligner adapter's fields, as they appear in a recipe (mapped 1:1 onto ``AlignerConfig``)."""

    aligner_num_tokens: int = option(1, help="Number N of global tokens shared by all layers.")
    aligner_start_layer: int = option(2, help="First adapted layer (2 in every published run).")
    aligner_layers: list[int] | None = option(
        None, help="Explicit list of adapted layer indices (overrides aligner_start_layer)."
    )


def _score_arguments() -> type:
    """warmup-dpo's fields: :class:`~hf_align.scores.ScoreOptions` as ``score_*`` and
    :class:`~hf_align.masks.MaskSelection` as ``neuron_mask_*`` (the trainers' names; the training ``seed`` seeds
    ``neuron_mask_select: random``)."""
    from hf_align.config_checks import prefixed_dataclass
    from hf_align.masks import MaskSelection
    from hf_align.scores import ScoreOptions

    scores = prefixed_dataclass("ScoreArguments", ScoreOptions, "score_", __name__)
    selection = prefixed_dataclass("MaskArguments", MaskSelection, "neuron_mask_", __name__, exclude=("seed",))
    return dataclasses.make_dataclass("NeuronScoreArguments", [], bases=(selection, scores))


EXTRA: dict[str, tuple[type, ...]] = {
    "npo": (NPODataArguments,),
    "warmup-dpo": (),  # + _score_arguments(), built on use (it imports torch)
    "aligner-sft": (AlignerArguments,),
    "aligner-dpo": (AlignerArguments,),
}
"""A command's dataclasses beyond TRL's script tuple."""
RENAMED = {"warmup-dpo": {f"--select_{name}": f"--neuron_mask_{name}" for name in ("ratio", "scope", "exclude_top")}}
"""Old spellings, accepted with a warning for one release (CHANGELOG.md, "Deprecated")."""
NO_MIXTURE = ("feedback",)
"""Commands without TRL's ``DatasetMixtureConfig`` (their data is not one TRL dataset)."""


def training_commands(own_commands) -> dict[str, str]:
    """name → one-line help of every training command: the registry's entries not in ``own_commands`` (the
    commands with a module of their own; passed in, so that this module needs nothing from the dispatcher)."""
    from hf_align.trainers.registry import TRAINERS

    return {name: spec.summary for name, spec in TRAINERS.items() if name not in own_commands}


def make_parser(name: str):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from hf_align.cli.common import CommandParser
    from hf_align.trainers.registry import TRAINERS

    spec = TRAINERS[name]
    config, extra = spec.config_class(), EXTRA.get(name, ()) + ((_score_arguments(),) if name == "warmup-dpo" else ())
    mixture = () if name in NO_MIXTURE else (DatasetMixtureConfig,)
    parent = next((c for c in config.__mro__ if c.__module__.startswith(("trl.", "transformers."))), object)
    inherited = {f.name for f in dataclasses.fields(parent)} if dataclasses.is_dataclass(parent) else set()
    own = [f.name for t in (config, *extra) for f in dataclasses.fields(t) if f.name not in inherited]
    description = f"{spec.summary}\n\nhf-align's own fields: {', '.join(own) or 'none'}; the others are TRL's."
    return CommandParser(
        (ScriptArguments, config, ModelConfig, *mixture, *extra),
        f"hf-align {name}",
        renamed=RENAMED.get(name),
        strict=False,
        description=description,
        epilog=LAUNCH_HELP,
        usage=f"hf-align {name} [--config RECIPE.yaml] [--field value ...] [launch flags]",
    )


def parse(name: str, argv: list[str]) -> tuple[list, list[str], list[str]]:
    """(dataclass instances, the recipe's and the command line's launch arguments); an unknown field is an error."""
    from hf_align.cli.common import TRUST_REMOTE_CODE

    *parsed, config_remaining, cli_remaining = make_parser(name).parse(argv, remaining=True)
    from accelerate.commands.launch import launch_command_parser  # after `--help` has printed and exited
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    for where, remaining in (("in the recipe", config_remaining), ("on the command line", cli_remaining)):
        launch = resolve_accelerate_config_argument([a for a in remaining if a.split("=")[0] != TRUST_REMOTE_CODE])
        _, unknown = launch_command_parser().parse_known_args([*launch, "-"])
        unknown = [arg.lstrip("-").split("=")[0] for arg in unknown if arg.startswith("--")]
        if unknown:
            raise SystemExit(
                f"hf-align {name}: unknown field(s) {where}: {', '.join(unknown)}. Check the spelling against "
                f"`hf-align {name} --help`."
            )
    from hf_align.checkpoints import resolve_resume_checkpoint

    for args in parsed:  # resume_from_checkpoint → the last *complete* checkpoint (or refused), before any loading
        if hasattr(args, "resume_from_checkpoint") and hasattr(args, "output_dir"):
            args.resume_from_checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    launch = [
        [a for a in remaining if a.split("=")[0] != TRUST_REMOTE_CODE]
        for remaining in (config_remaining, cli_remaining)
    ]
    return parsed, *launch


def run_command(name: str, argv: list[str], launch: bool | None = None) -> int:
    """Validate, then run in-process or through ``accelerate launch`` (``launch=None``: when a launch flag is given)."""
    parsed, recipe_launch, cli_launch = parse(name, argv)  # checks the recipe's permissions first
    launch_args = recipe_launch + cli_launch
    if launch is None:
        launch = bool(launch_args) and "--no_launch" not in argv and os.environ.get("HF_ALIGN_NO_LAUNCH") != "1"
    if not launch:
        from hf_align.scripts import train

        return int(train.run(name, *parsed) or 0)

    import subprocess

    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.accelerate_launcher import launch_training_script

    def start(accelerate_args) -> None:
        if _needs_cpu_processes(accelerate_args):
            # accelerate's CPU path starts ONE process without an MPI hostfile; its torchrun path starts them all,
            # and each one joins a gloo group when its TrainingArguments ask for the CPU.
            accelerate_args.multi_gpu, accelerate_args.cpu = True, False
            if not any(getattr(args, "use_cpu", False) for args in parsed):
                accelerate_args.training_script_args += ["--use_cpu", "true"]
            print(f"[hf-align] no GPU: {accelerate_args.num_processes} CPU processes (torch.distributed, gloo)")
            sys.stdout.flush()
        from accelerate.commands.launch import launch_command

        launch_command(accelerate_args)

    script_args = _subtract_subsequence(argv, cli_launch)  # --trust_remote_code stays: the processes check again
    safe_path = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"  # the launched processes must not put this file's folder on sys.path
    try:  # an absolute script path: TRL's helper joins it onto trl/scripts, which keeps an absolute path as it is
        launch_training_script(
            str(Path(__file__).resolve()),
            resolve_accelerate_config_argument(launch_args),
            [name, *script_args],
            launch_command_fn=start,
        )
    except subprocess.CalledProcessError as err:  # the process already printed its one-line error
        return err.returncode or 1
    finally:
        if safe_path is None:
            os.environ.pop("PYTHONSAFEPATH")
        else:
            os.environ["PYTHONSAFEPATH"] = safe_path
    return 0


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence`` (the launcher's own flags), as ``trl``'s CLI does."""
    remaining, it = [], iter(subsequence)
    current = next(it, None)
    for item in items:
        if current is not None and item == current:
            current = next(it, None)
        else:
            remaining.append(item)
    return remaining


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


if __name__ == "__main__":  # each process `accelerate launch` starts runs this file
    from hf_align.cli.errors import quiet_optional_kernel_notice, run_guarded
    from hf_align.cli.training import run_command as _run_command  # the module, not this __main__ copy

    quiet_optional_kernel_notice()
    command, *rest = sys.argv[1:]
    sys.exit(run_guarded(command, lambda: _run_command(command, rest, launch=False)))
