"""``hf-align env``: versions and capabilities, to paste into bug reports — what ``trl env`` shows, and more.

Like ``trl env``: platform, Python, the HF stack, the accelerator(s), the default accelerate config, the optional
backends (bitsandbytes, DeepSpeed, Liger-Kernel, PEFT, vLLM); plus hf-align's own extras and the logging
integrations ``report_to`` can use. Versions come from package metadata, so nothing heavy is imported to read them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass


PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "evaluate",
    "huggingface_hub",
    "safetensors",
    "bitsandbytes",
    "deepspeed",
    "liger_kernel",
    "vllm",
    "matplotlib",
)
LOGGING_INTEGRATIONS = ("wandb", "trackio", "tensorboard", "mlflow", "comet_ml", "clearml", "dvclive", "swanlab")
"""``report_to`` backends transformers knows; the ones installed are listed under ``logging``."""


def _version(name: str) -> str:
    for dist in (name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed" if importlib.util.find_spec(name) is not None else "not installed"


def _accelerate_config() -> str:
    """The default accelerate config (what ``accelerate launch`` uses without ``--config_file``), as ``trl env``."""
    import os

    from accelerate.commands.config import default_config_file, load_config_from_file

    if not os.path.isfile(default_config_file):
        return "not found"
    config = load_config_from_file(default_config_file).to_dict()
    return "".join(f"\n  - {key}: {value}" for key, value in config.items())


def collect() -> dict[str, str]:
    from hf_align import __version__

    info = {"python": platform.python_version(), "platform": platform.platform(), "hf_align": __version__}
    info.update({name: _version(name) for name in PACKAGES})
    try:
        import torch

        info["cuda"] = torch.version.cuda or "none"
        info["cuda_available"] = str(torch.cuda.is_available())
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["bf16_supported"] = str(torch.cuda.is_bf16_supported())
        elif torch.backends.mps.is_available():
            devices = ["MPS"]
        elif hasattr(torch, "xpu") and torch.xpu.is_available():
            devices = [torch.xpu.get_device_name(i) for i in range(torch.xpu.device_count())]
        info["accelerator(s)"] = ", ".join(devices)
    except Exception:  # noqa: BLE001 - a broken torch install is itself worth reporting, not crashing on
        info["cuda_available"] = "torch not importable"
    try:
        info["accelerate_config"] = _accelerate_config()
    except Exception as err:  # noqa: BLE001 - an unreadable config is reported, not raised
        info["accelerate_config"] = f"unreadable ({err})"
    installed = [f"{name} {_version(name)}" for name in LOGGING_INTEGRATIONS if importlib.util.find_spec(name)]
    info["logging"] = ", ".join(installed) or "none (report_to: none)"
    return info


@dataclass
class EnvArguments:
    """``hf-align env`` has no options of its own; it takes ``--config`` like every command."""


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    parse_command("hf-align env", (EnvArguments,), argv, description=__doc__)
    for key, value in collect().items():
        print(f"- {key}: {value}")
    return 0
