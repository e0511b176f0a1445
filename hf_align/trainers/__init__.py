"""TRL-style trainers: each an ``XTrainer`` + ``XConfig`` pair (imported lazily)."""

from hf_align._lazy import lazy_getattr


_EXPORTS = {
    "MaskedDPOTrainer": "masked_dpo",
    "MaskedDPOConfig": "masked_dpo",
    "NPOTrainer": "npo",
    "NPOConfig": "npo",
    "FeedbackConditionedTrainer": "feedback_conditioned",
    "FeedbackConditionedConfig": "feedback_conditioned",
    "AdaptiveMergeTrainer": "adaptive_merge",
    "AdaptiveMergeConfig": "adaptive_merge",
    "MaskedKTOTrainer": "masked_kto",
    "MaskedKTOConfig": "masked_kto",
    "TRAINERS": "registry",
    "TrainerSpec": "registry",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__():
    return __all__
