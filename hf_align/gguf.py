"""GGUF input: a ``.gguf`` file (or a folder plus ``gguf_file``) wherever a model is taken.

Chat models are often distributed as a single GGUF file (llama.cpp's format). transformers reads it with the
``gguf`` package; loaded with ``GgufConfig(dequantize=True)`` the weights are unpacked into an ordinary dense model in
the requested dtype, which trains and saves as a normal safetensors folder. Without ``dequantize`` transformers keeps
the weights packed and the model can be neither trained nor saved, so every load here dequantizes.

The header is checked first (a few seconds, no weight is unpacked) so that a truncated file, an architecture
transformers cannot map or a quantization type nobody can unpack is one line naming the file, not a traceback from
deep inside the loader.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_align.errors import UserError


__all__ = ["GGUFInfo", "gguf_card", "gguf_file_of", "gguf_load_kwargs", "gguf_source_line", "read_gguf_info"]

SUFFIX = ".gguf"
PLAIN_TYPES = ("F32", "F16", "BF16")
HUB_URL_KEYS = ("general.repo_url", "general.url", "general.source.repo_url", "general.source.url")
"""Header fields that may hold this model's (or the release it was converted from) Hub address, in that order.
``general.base_model.*`` names the model's *parents* (the base it was fine-tuned from): never this model's id."""
_HUB_URL = re.compile(r"^https?://huggingface\.co/(?P<id>[A-Za-z0-9][\w.-]*/[\w.-]+)/?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says about the model: enough for a card and for the checks."""

    path: str
    architecture: str
    name: str | None
    license: str | None
    tensor_types: tuple[str, ...]
    hub_id: str | None = None
    """The model's Hub id when the header gives one (:data:`HUB_URL_KEYS`, or a ``general.name`` of the form
    ``org/name``); never guessed from the other fields."""
    quant: str | None = None
    """The file's quantization (``general.file_type``: ``Q4_1``, ``F16``...), else its non-float tensor types."""


def gguf_file_of(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model argument names: ``x.gguf`` itself, or ``folder`` + ``gguf_file``; ``None`` otherwise."""
    path = Path(name_or_path)
    if gguf_file:
        return path / gguf_file if path.is_dir() else Path(gguf_file)
    return path if path.suffix.lower() == SUFFIX else None


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _unpackable(type_name: str) -> bool:
    """Whether the ``gguf`` package can dequantize a tensor of this ggml type (one zero block is enough to know)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    if type_name in PLAIN_TYPES:
        return True
    qtype = GGMLQuantizationType[type_name]
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def _hub_id(reader: Any) -> str | None:
    for key in HUB_URL_KEYS:
        match = _HUB_URL.match(str(_field(reader, key) or "").strip())
        if match:
            return match["id"]
    name = str(_field(reader, "general.name") or "").strip()
    return name if _HUB_ID.match(name) else None


def _quant(reader: Any, types: tuple[str, ...]) -> str | None:
    from gguf import LlamaFileType

    file_type = _field(reader, "general.file_type")
    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):  # absent, or a type this gguf version does not know
        quantized = [name for name in types if name not in PLAIN_TYPES]
        return ", ".join(quantized or types) or None


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Parse and check a GGUF header; every problem is a one-line :class:`UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise UserError(
            f"{path}: reading a GGUF file needs the `gguf` package (pip install gguf, or `make real-model`)."
        ) from err
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct.error/IndexError... on a damaged file
        raise UserError(f"{path}: not a readable GGUF file (truncated or damaged: {err}).") from err
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = _field(reader, "general.architecture")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{path}: GGUF architecture {architecture!r} is not supported by transformers "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})."
        )
    types = tuple(sorted({tensor.tensor_type.name for tensor in reader.tensors}))
    unsupported = [name for name in types if not _unpackable(name)]
    if unsupported:
        raise UserError(f"{path}: GGUF quantization type(s) {unsupported} cannot be dequantized.")
    name, licence = _field(reader, "general.name"), _field(reader, "general.license")
    return GGUFInfo(str(path), architecture, name, licence, types, _hub_id(reader), _quant(reader, types))


def gguf_load_kwargs(gguf_path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(folder, kwargs)`` for ``from_pretrained(folder, **kwargs)`` of a checked GGUF file, dequantized.

    The tokenizer takes the same ``folder`` and ``gguf_file`` (without ``quantization_config``).
    """
    from transformers import GgufConfig

    path = Path(gguf_path)
    read_gguf_info(path)
    return str(path.parent), {"gguf_file": path.name, "quantization_config": GgufConfig(dequantize=True)}


def gguf_source_line(info: GGUFInfo) -> str:
    """The card line naming a GGUF source: its file and quantization, baked into whatever was made from it."""
    return (
        f"Loaded from the GGUF file `{Path(info.path).name}` (quantization {info.quant or 'unknown'}, architecture "
        f"`{info.architecture}`), dequantized: its weights are the GGUF's, not the full-precision release's."
    )


def gguf_card(info: GGUFInfo, dtype: str) -> str:
    """The README of a folder converted from a GGUF file: its source (``base_model`` when the header gives its Hub
    id, so that a model trained from the folder names it too), tensor types, dtype and licence."""
    source = Path(info.path).name
    return "\n".join(
        [
            "---",
            f"license: {info.license or 'other'}",
            *([f"base_model: {info.hub_id}"] if info.hub_id else []),
            "library_name: transformers",
            "tags:",
            "- gguf-conversion",
            "- hf-align",
            "---",
            "",
            f"# {info.name or source}",
            "",
            f"Converted by hf-align from the GGUF file `{source}` (architecture `{info.architecture}`, tensor types "
            f"{', '.join(info.tensor_types)}), dequantized to `{dtype}` and saved as a plain safetensors folder.",
            "The quantization of the source is baked into these weights: they equal the GGUF's, not the original "
            "full-precision release's.",
            "",
            f"Licence of the source: {info.license or 'not stated in the file'}.",
            "",
        ]
    )
