"""The one place hf-align loads a model or a tokenizer by name or path (outside a trainer's TRL-style policy load).

Every trainer, callback and core function that turns a string into a model goes through :func:`load_model` /
:func:`load_tokenizer`, so the rules hold everywhere at once: ``trust_remote_code`` is False unless the caller passes
it (code in a downloaded folder is never run unasked), weights are read as transformers reads them (safetensors;
a folder path is a ``str`` for the Hub client), and a ``dtype`` given as a string is checked by name.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hf_align.errors import UserError


__all__ = ["DTYPES", "load_model", "load_tokenizer"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {DTYPES} or a torch.dtype, got {dtype!r}.")
    return getattr(torch, dtype)


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
    if architecture is None:
        from transformers import AutoModelForCausalLM as architecture
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    if revision is not None:
        kwargs["revision"] = revision
    return architecture.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code, **kwargs)


def load_tokenizer(
    name_or_path: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False, **kwargs: Any
):
    """``AutoTokenizer.from_pretrained(name_or_path, ...)`` with ``trust_remote_code`` False unless passed."""
    from transformers import AutoTokenizer

    if revision is not None:
        kwargs["revision"] = revision
    return AutoTokenizer.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
