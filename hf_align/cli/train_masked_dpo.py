"""``hf-align masked-dpo``: DPO on a neuron mask with token weights (ALLO's improving stage)."""

from __future__ import annotations

from hf_align.cli.common import (
    load_dataset_any,
    load_model_and_tokenizer,
    make_trl_parser,
    require_columns,
    split,
    train_and_save,
)


def make_parser(prog: str | None = None, command: str = "masked-dpo"):
    from hf_align.trainers import MaskedDPOConfig

    return make_trl_parser(MaskedDPOConfig, prog or f"hf-align {command}")


def run(script_args, training_args, model_args, command: str = "masked-dpo") -> int:
    from trl import get_peft_config

    from hf_align.trainers import MaskedDPOTrainer

    source = f"dataset_name {script_args.dataset_name!r}"
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
    train = split(dataset, script_args.dataset_train_split, source)
    require_columns(train, ("prompt", "chosen", "rejected"), source)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    trainer = MaskedDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, training_args, script_args)
    return 0
