"""``hf-align env``: versions and capabilities, to paste into bug reports."""

from __future__ import annotations

import importlib
import platform


PACKAGES = (
    "hf_align",
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
    "vllm",
    "matplotlib",
    "deepspeed",
)


def collect() -> dict[str, str]:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - any import failure means "not usable"
            info[name] = "not installed"
    try:
        import torch

        info["cuda"] = torch.version.cuda or "none"
        info["cuda_available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["bf16_supported"] = str(torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001
        pass
    return info


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: hf-align env\n\nPrint versions of the packages hf-align uses and what hardware is visible.")
        return 0
    for key, value in collect().items():
        print(f"- {key}: {value}")
    return 0
