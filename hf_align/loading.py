"""The one place hf-align loads a model or a tokenizer by name or path (outside a trainer's TRL-style policy load).

Every trainer, callback and core function that turns a string into a model goes through :func:`load_model` /
:func:`load_tokenizer`, so the rules hold everywhere at once: ``trust_remote_code`` is False unless the caller passes
it (code in a downloaded folder is never run unasked), weights are read as transformers reads them (safetensors;
a folder path is a ``str`` for the Hub client), and a ``dtype`` given as a string is checked by name. A ``.gguf`` file
(or a folder with ``gguf_file=``) is checked and loaded dequantized (:mod:`hf_align.gguf`), tokenizer included.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from hf_align.config_checks import check_choice
from hf_align.errors import UserError


__all__ = [
    "DTYPES",
    "check_gguf_inputs",
    "convert_gguf",
    "gguf_as_checkpoints",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The dtypes a model loads in (``auto``: the checkpoint's)."""
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(
    dtype: str | torch.dtype | None, choices: tuple[str, ...] = (*DTYPES, "float64"), label: str = "dtype"
) -> torch.dtype | None:
    """The one dtype rule (loading, merging, conversion): ``None``/``"auto"`` → ``None`` (keep the weights' dtype), a
    ``torch.dtype`` as it is, a name or alias (``bf16``, ``fp16``, ``half``, ``fp32``, ``float``) among ``choices`` →
    its ``torch.dtype``; anything else is one line naming ``label`` and the choices."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    check_choice(label, name, choices)
    return None if name == "auto" else getattr(torch, name)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    architecture: Any = None,
    **kwargs: Any,
):
    """``architecture.from_pretrained(name_or_path, ...)`` (default ``AutoModelForCausalLM``; e.g.
    ``AutoModelForSequenceClassification`` for a reward model, ``peft.AutoPeftModelForCausalLM`` for an adapter).
    ``dtype=None`` leaves transformers' default; other ``kwargs`` go to ``from_pretrained`` unchanged."""
    from hf_align.trust import require_bool

    require_bool(trust_remote_code, f"load_model({os.fspath(name_or_path)!r})")
    if architecture is None:
        from transformers import AutoModelForCausalLM as architecture
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype, DTYPES) or "auto"
    if revision is not None:
        kwargs["revision"] = revision
    gguf = _gguf_file(name_or_path, kwargs)
    name_or_path = _gguf_source(name_or_path, kwargs, model=True)
    model = architecture.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
    if gguf is not None:  # the file, not its folder: cards name the GGUF source (hub.hub_id), a reload finds it
        model.config._name_or_path = model.name_or_path = str(gguf)
    return model


def load_tokenizer(
    name_or_path: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False, **kwargs: Any
):
    """``AutoTokenizer.from_pretrained(name_or_path, ...)`` with ``trust_remote_code`` False unless passed."""
    from transformers import AutoTokenizer

    from hf_align.trust import require_bool

    require_bool(trust_remote_code, f"load_tokenizer({os.fspath(name_or_path)!r})")
    if revision is not None:
        kwargs["revision"] = revision
    name_or_path = _gguf_source(name_or_path, kwargs, model=False)
    return AutoTokenizer.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code, **kwargs)


def _gguf_file(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> Path | None:
    from hf_align.gguf import gguf_file_of

    return gguf_file_of(name_or_path, kwargs.get("gguf_file"))


def _gguf_source(name_or_path: str | os.PathLike, kwargs: dict[str, Any], model: bool) -> str | os.PathLike:
    """For a GGUF file: its folder, with ``gguf_file`` (and, for a model, dequantization) put into ``kwargs``."""
    from hf_align.gguf import gguf_load_kwargs

    path = _gguf_file(name_or_path, kwargs)
    if path is None:
        return name_or_path
    folder, gguf_kwargs = gguf_load_kwargs(path)
    kwargs["gguf_file"] = gguf_kwargs["gguf_file"]
    if model:
        if kwargs.get("quantization_config") is not None:
            raise UserError(
                f"{path}: a GGUF file is loaded dequantized; quantization_config (e.g. --load_in_4bit) cannot be "
                "combined with it. Convert it first (hf_align.loading.convert_gguf) and quantize the folder."
            )
        kwargs["quantization_config"] = gguf_kwargs["quantization_config"]
    return folder


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Write a GGUF model as a normal transformers folder (weights, config, tokenizer, card), atomically.

    The folder is complete or absent: it is written beside ``output_dir`` and renamed into place.
    """
    from hf_align.gguf import gguf_card, read_gguf_info
    from hf_align.io import atomic_dir

    parse_dtype(dtype, ("bfloat16", "float16", "float32"))  # before the file is read
    info = read_gguf_info(gguf_path)
    model = load_model(gguf_path, dtype=dtype)
    tokenizer = load_tokenizer(gguf_path)
    model.config._name_or_path = info.name or Path(gguf_path).stem  # not the local folder the file sat in
    with atomic_dir(output_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "README.md").write_text(gguf_card(info, dtype), encoding="utf-8")
    return Path(output_dir)


def check_gguf_inputs(*names_or_paths: str | os.PathLike | None) -> list[Path | None]:
    """The GGUF file each argument names (``None`` for any other model), every one's header checked first: a
    command taking several models fails on a bad file before it loads or converts any of them."""
    from hf_align.gguf import gguf_file_of, read_gguf_info

    files = [None if name is None else gguf_file_of(name) for name in names_or_paths]
    for file in files:
        if file is not None:
            read_gguf_info(file)
    return files


def gguf_as_checkpoints(
    stack: contextlib.ExitStack, *names_or_paths: str | os.PathLike | None
) -> list[str | os.PathLike | None]:
    """``names_or_paths`` with each ``.gguf`` file replaced by a safetensors folder converted from it, for readers of
    safetensors checkpoints (the streaming merge, weight-diff scores); every header is checked before any is
    converted. The folders are temporary: ``stack`` removes them. float32: a dequantized GGUF is exact in it."""
    from hf_align.io import scratch_dir

    files = check_gguf_inputs(*names_or_paths)
    converted = []
    for name, file in zip(names_or_paths, files):
        if file is not None:
            folder = stack.enter_context(scratch_dir(Path(tempfile.gettempdir()) / f"hf_align_gguf_{file.stem}"))
            name = convert_gguf(file, folder / "model", dtype="float32")
        converted.append(name)
    return converted
