"""Aligner (arXiv 2312.05503) as a PEFT method: importing this package registers it with PEFT."""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from hf_align.peft_tuners.aligner.config import ALIGNER_PEFT_TYPE_NAME, AlignerConfig
from hf_align.peft_tuners.aligner.layer import ATTENTION_SPECS, SUPPORTED_MODEL_TYPES, AlignerAttention
from hf_align.peft_tuners.aligner.model import AlignerModel


__all__ = ["ATTENTION_SPECS", "SUPPORTED_MODEL_TYPES", "AlignerAttention", "AlignerConfig", "AlignerModel"]


def _register() -> None:
    """Register Aligner with PEFT once (``get_peft_model``, ``PeftModel.from_pretrained``, saving)."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType[ALIGNER_PEFT_TYPE_NAME]) is AlignerModel:
        return
    register_peft_method(name=ALIGNER_PEFT_TYPE_NAME.lower(), config_cls=AlignerConfig, model_cls=AlignerModel)


_register()
