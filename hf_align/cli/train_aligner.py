"""``hf-align aligner-sft`` / ``hf-align aligner-dpo``: TRL's SFT/DPO trainers with an Aligner adapter.

They parse what ``trl sft`` / ``trl dpo`` parse plus the ``aligner_`` fields, so TRL's recipes run here (the
Aligner adapter takes the place of ``--use_peft``'s LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_align.cli.common import PREFERENCE_COLUMNS, make_trl_parser, train_command


@dataclass
class AlignerArguments:
    """The Aligner adapter's fields, as they appear in a recipe (mapped 1:1 onto ``AlignerConfig``)."""

    aligner_num_tokens: int = field(default=1, metadata={"help": "Number N of global tokens shared by all layers."})
    aligner_start_layer: int = field(default=2, metadata={"help": "First adapted layer (2 in every published run)."})
    aligner_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit list of adapted layer indices (overrides aligner_start_layer)."}
    )


def _config_class(command: str):
    from trl import DPOConfig, SFTConfig

    return SFTConfig if command == "aligner-sft" else DPOConfig


def make_parser(prog: str | None = None, command: str = "aligner-sft"):
    return make_trl_parser(
        _config_class(command), prog or f"hf-align {command}", extra=(AlignerArguments,), mixture=True
    )


def run(script_args, training_args, model_args, dataset_args, aligner_args, command: str = "aligner-sft") -> int:
    from trl import DPOTrainer, SFTTrainer

    from hf_align.peft_tuners import AlignerConfig

    peft_config = AlignerConfig(
        num_tokens=aligner_args.aligner_num_tokens,
        start_layer=aligner_args.aligner_start_layer,
        layers_to_transform=aligner_args.aligner_layers,
        task_type="CAUSAL_LM",
    )
    _check_architecture(peft_config, model_args, training_args)  # from the config alone, before any weight is loaded
    dpo = command == "aligner-dpo"
    trainer_class, columns = (DPOTrainer, PREFERENCE_COLUMNS) if dpo else (SFTTrainer, None)
    return train_command(
        trainer_class, script_args, training_args, model_args, dataset_args, columns, peft_config=peft_config
    )


def _check_architecture(peft_config, model_args, training_args) -> None:
    from transformers import AutoConfig

    from hf_align.cli.common import resolve_model_path
    from hf_align.peft_tuners.aligner.model import check_model_config

    path = resolve_model_path(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(
        path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    check_model_config(peft_config, config.to_dict())
