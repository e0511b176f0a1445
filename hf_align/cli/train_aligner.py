"""``hf-align aligner-sft`` / ``hf-align aligner-dpo``: TRL's SFT/DPO trainers with an Aligner adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_align.cli.common import (
    load_dataset_any,
    load_model_and_tokenizer,
    make_trl_parser,
    require_columns,
    split,
    train_and_save,
)


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
    return make_trl_parser(_config_class(command), prog or f"hf-align {command}", extra=(AlignerArguments,))


def run(script_args, training_args, model_args, aligner_args, command: str = "aligner-sft") -> int:
    from peft import get_peft_model
    from trl import DPOTrainer, SFTTrainer

    from hf_align.peft_tuners import AlignerConfig

    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
    train = split(dataset, script_args.dataset_train_split, f"dataset_name {script_args.dataset_name!r}")
    needed = ("prompt", "chosen", "rejected") if command == "aligner-dpo" else ()
    require_columns(train, needed, f"dataset_name {script_args.dataset_name!r}")
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    peft_config = AlignerConfig(
        num_tokens=aligner_args.aligner_num_tokens,
        start_layer=aligner_args.aligner_start_layer,
        layers_to_transform=aligner_args.aligner_layers,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    trainer_class = DPOTrainer if command == "aligner-dpo" else SFTTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    train_and_save(trainer, training_args, script_args)
    return 0
