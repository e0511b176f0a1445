"""bitsandbytes helpers shared by the tuners and trainers that train on a 4-bit base.

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight for fast inference the first time the
layer runs in eval mode without gradients, and from then on uses a kernel with no autograd: gradients silently stop
flowing through that layer, also after ``model.train()``, so adapters and deltas *below* it get no gradient. Its
own inverse (``_convert_weight_packed_for_cpu_inverse``) restores the packed data but leaves the block scales
(``absmax``) in the inference layout, which dequantizes to wrong weights. :func:`keep_4bit_trainable` restores the
layout correctly (the scales keep the bf16 rounding the inference layout gave them, i.e. the weights the eval
forward used) and turns the repacking off, so training and evaluation compute the same base.
"""

from __future__ import annotations

import torch


__all__ = ["keep_4bit_trainable", "restore_trainable_layout"]


def restore_trainable_layout(module: torch.nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference repacking of one ``Linear4bit``; True if it was repacked."""
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    scales = quant_state.absmax  # inference layout: (K / blocksize, N) in bf16
    data, quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
    if scales.dim() == 2:
        quant_state.absmax = scales.t().reshape(-1).float()
    weight.data, weight.quant_state = data, quant_state
    return True


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Restore every repacked ``Linear4bit`` of ``model`` and stop further repacking; returns how many it restored."""
    restored = 0
    for module in model.modules():
        if getattr(getattr(module, "weight", None), "quant_state", None) is None:
            continue
        restored += restore_trainable_layout(module)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return restored
