"""What hf-align needs to know about a model's architecture, written once: where a decoder layer's index is in a
parameter name, and which axis of a weight holds its output features (its "neurons").

* **Plain names** -- masks and scores are keyed by the plain model's parameter names; :func:`plain_name` strips
  PEFT's wrappers.
* **Layer index** -- one rule for masks, plots, scores and merges: ``model.layers.3.…`` (Llama, Qwen, Mistral,
  Gemma…), ``transformer.h.3.…`` (GPT-2, GPT-J, Falcon, BLOOM…), ``….blocks.3.…``.
* **Output axis** -- a neuron is one output feature. ``nn.Linear`` stores its weight ``(out, in)``: axis 0.
  GPT-2-style ``transformers.pytorch_utils.Conv1D`` stores it ``(in, out)``: axis 1, so a "row" mask of a Conv1D
  weight selects *columns*. Everything that reduces, selects or updates rows asks :func:`neuron_axes`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


__all__ = [
    "LAYER_PATTERN",
    "ROW_TARGET",
    "checkpoint_neuron_axes",
    "checkpoint_parameter_order",
    "in_order",
    "layer_index",
    "neuron_axes",
    "neuron_axis",
    "plain_name",
]

_PEFT_PREFIX = "base_model.model."
_ADAPTER_MARKERS = (".lora_", ".lora_magnitude_vector", ".original_module.", ".aligner_", "prompt_encoder.")
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
ROW_TARGET = r"(?:^|\.)(?:layers|h|blocks)\.\d+\..*\.weight$"
"""Decoder-layer weights: the default target of row masks (only those with two or more dims get rows)."""


def plain_name(name: str) -> str | None:
    """Map a (possibly PEFT-wrapped) parameter name to the plain model's name; ``None`` for adapter weights.

    ``base_model.model.model.layers.0.q_proj.base_layer.weight`` → ``model.layers.0.q_proj.weight``;
    ``...lm_head.modules_to_save.default.weight`` → ``lm_head.weight``; ``...lora_A.default.weight`` → None.
    """
    if any(marker in name for marker in _ADAPTER_MARKERS):
        return None
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    name = name.replace(".base_layer.", ".")
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name


def layer_index(name: str) -> int | None:
    """``model.layers.12.self_attn.q_proj.weight`` → 12, ``transformer.h.3.attn.c_attn.weight`` → 3; ``None``
    outside the decoder layers (embeddings, final norm, ``lm_head``)."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def neuron_axes(model: torch.nn.Module) -> dict[str, int]:
    """``{plain parameter name: 1}`` for every weight whose output features lie on axis 1 (``Conv1D``); every
    other parameter has them on axis 0 and is left out."""
    from transformers.pytorch_utils import Conv1D

    axes = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Conv1D):  # a parametrized Conv1D is a subclass: still found
            plain = plain_name(f"{module_name}.weight" if module_name else "weight")
            if plain is not None:
                axes[plain] = 1
    return axes


def neuron_axis(axes: Mapping[str, int] | None, name: str) -> int:
    """The output-feature axis of parameter ``name`` (0 unless ``axes`` says otherwise)."""
    return (axes or {}).get(name, 0)


def row_length(shape: tuple[int, ...], axis: int) -> int:
    """Parameters per neuron of a weight of ``shape`` whose output features lie on ``axis``: a row's length (every
    entry but that axis), 1 for a 1-D tensor (one entry is one neuron)."""
    return math.prod(shape) // shape[axis] if len(shape) >= 2 else 1


def checkpoint_neuron_axes(path: str | Path) -> dict[str, int]:
    """:func:`neuron_axes` for a saved checkpoint folder, from its ``config.json`` alone (:func:`_meta_model`). A
    folder without a config, or with a config transformers cannot build without remote code, has no Conv1D weights
    we know of: ``{}``."""
    model = _meta_model(path)
    return neuron_axes(model) if model is not None else {}


def checkpoint_parameter_order(path: str | Path) -> list[str] | None:
    """The plain parameter names of a saved checkpoint in the model's order (``model.named_parameters()``; a
    safetensors file lists them alphabetically), from its ``config.json`` alone; None when it cannot be built."""
    model = _meta_model(path)
    return None if model is None else [n for n in (plain_name(name) for name, _ in model.named_parameters()) if n]


def in_order(mapping: Mapping[str, Any], order: Sequence[str] | None) -> dict[str, Any]:
    """``mapping`` with its keys in ``order`` (parameter names in model order); keys ``order`` lacks follow, as
    they were. Masks and scores are saved with their order, as JSON headers and safetensors sort their keys."""
    if not order:
        return dict(mapping)
    rank = {name: i for i, name in enumerate(order)}
    return {name: mapping[name] for name in sorted(mapping, key=lambda name: rank.get(name, len(rank)))}


def _meta_model(path: str | Path) -> torch.nn.Module | None:
    """The causal LM of checkpoint folder ``path`` built on the meta device from its ``config.json`` (no weights
    read, no remote code run); None without a config or for an architecture transformers does not ship."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError):  # an architecture transformers does not ship: nothing to tell
        return None
