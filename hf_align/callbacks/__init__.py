"""``transformers.TrainerCallback``s that work with any Trainer (imported lazily)."""

from hf_align._lazy import lazy_getattr


_EXPORTS = {
    "MaskAccumulationCallback": "mask_accumulation",
    "AMAMergeCallback": "ama_merge",
    "JsonTrainingArgsCallback": "json_training_args",
    "NoOpWarningCallback": "no_op_warnings",
    "TrainingPlotsCallback": "plots",
    "add_default_callbacks": "defaults",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__():
    return __all__
