"""``hf-align env``: what ``trl env`` prints (TRL's ``print_env``: platform, Python, the HF stack, accelerators, the
default accelerate config, bitsandbytes/DeepSpeed/Liger/PEFT/vLLM), then hf-align's own lines (its version and
extras, CUDA, the logging integrations ``report_to`` can use), to paste into bug reports."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass


PACKAGES = ("hf_align", "torch", "trl", "peft", "evaluate", "safetensors", "matplotlib")
LOGGING_INTEGRATIONS = ("wandb", "trackio", "tensorboard", "mlflow", "comet_ml", "clearml", "dvclive", "swanlab")


@dataclass
class EnvArguments:
    """``hf-align env`` has no options of its own; it takes ``--config`` like every command."""


def _version(name: str) -> str:
    for dist in (name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed" if importlib.util.find_spec(name) is not None else "not installed"


def collect() -> dict[str, str]:
    """hf-align's lines (``trl env`` prints the rest)."""
    import torch

    info = {name: _version(name) for name in PACKAGES}
    info["cuda"], info["cuda_available"] = torch.version.cuda or "none", str(torch.cuda.is_available())
    if torch.cuda.is_available():
        info["bf16_supported"] = str(torch.cuda.is_bf16_supported())
    installed = [f"{name} {_version(name)}" for name in LOGGING_INTEGRATIONS if importlib.util.find_spec(name)]
    info["logging"] = ", ".join(installed) or "none (report_to: none)"
    return info


def main(argv: list[str] | None = None) -> int:
    from trl.scripts.env import print_env

    from hf_align.cli.common import parse_command

    parse_command("hf-align env", (EnvArguments,), argv, description=__doc__)
    print_env()
    print("\n".join(f"- {key}: {value}" for key, value in collect().items()))
    return 0
