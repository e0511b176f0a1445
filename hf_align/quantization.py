"""bitsandbytes helpers shared by the tuners and trainers that train on a 4-bit base.

On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight for fast inference the first time the layer
runs in eval mode without gradients, and from then on uses a kernel with no autograd: gradients silently stop
flowing through that layer, also after ``model.train()`` (bitsandbytes 0.50). Adapters and deltas *below* such a
layer then get no gradient. :func:`unpack_cpu_inference_weights` undoes the repacking; the Aligner tuner calls it
before every forward that records gradients.
"""

from __future__ import annotations

import torch


__all__ = ["unpack_cpu_inference_weights"]


def unpack_cpu_inference_weights(model: torch.nn.Module) -> int:
    """Restore bitsandbytes' trainable 4-bit layout wherever CPU inference repacked it; returns how many layers."""
    restored = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
        restored += 1
    return restored
