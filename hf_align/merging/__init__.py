"""Model averaging (AMA): linear, partwise and adaptive merges, streamed tensor by tensor.

θ = α·θ_base + (1−α)·θ_aligned (α weighs the pre-alignment model). ``plan`` decides α per tensor,
``streaming`` writes the merged checkpoint, ``adaptive`` holds the math and modules of AMA's learned per-block α's
(the trainer that learns them is ``hf_align.trainers.AdaptiveMergeTrainer``: core imports no trainers).
"""

from hf_align._lazy import lazy_getattr


_EXPORTS = {
    "MergePlan": "plan",
    "linear_plan": "plan",
    "partwise_plan": "plan",
    "partwise_builder": "plan",
    "parse_pivots": "plan",
    "parse_alphas": "plan",
    "tensor_role": "plan",
    "layer_index": "plan",
    "Checkpoint": "streaming",
    "MergeResult": "streaming",
    "merge_models": "streaming",
    "merge_tensor": "streaming",
    "AlphaParameters": "adaptive",
    "InterpolatedLinear": "adaptive",
    "LearnedAlphas": "adaptive",
    "block_assignment": "adaptive",
    "normalized_alphas": "adaptive",
    "adaptive_plan": "adaptive",
}
__all__ = sorted(_EXPORTS)
_MOVED = {  # core imports no trainer: these are only named here, never imported
    "AdaptiveMergeTrainer": "hf_align.trainers.AdaptiveMergeTrainer",
    "AdaptiveMergeConfig": "hf_align.trainers.AdaptiveMergeConfig",
}
__getattr__ = lazy_getattr(__name__, _EXPORTS, _MOVED)


def __dir__():
    return __all__
