"""``hf-align npo``: negative preference optimization (forget completions), token-weighted and neuron-masked.

Forget data (``dataset_name``): prompt-completion (standard or conversational), or a preference dataset whose
``rejected`` is the completion to forget; ``completion_weights`` / ``rejected_weights`` (e.g. from
``hf-align label-tokens``) weight its tokens. ``retain_dataset_name`` adds NPOConfig's retain term
(``retain_loss_type``, ``retain_weight``) on data to keep. ``neuron_mask_path`` (a folder from
``hf-align select-mask``) restricts the update to the selected neurons (ALLO's forgetting stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_align.cli.common import (
    load_dataset_any,
    load_model_and_tokenizer,
    make_trl_parser,
    split,
    train_and_save,
)


@dataclass
class NPODataArguments:
    """Where the retain data comes from (the forget data is TRL's ``dataset_name``)."""

    retain_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Data to keep while forgetting (prompt-completion or language modeling): a Hub id, a folder, a "
            "data file or `testbed:retain`. Enables NPOConfig's retain term (retain_loss_type, retain_weight)."
        },
    )
    retain_dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name of retain_dataset_name."}
    )
    retain_dataset_split: str = field(default="train", metadata={"help": "Split of retain_dataset_name to use."})


FORGET_FORMATS = (("prompt", "completion"), ("prompt", "rejected"), ("text",), ("messages",))


def check_forget_columns(dataset, source: str) -> None:
    """The forget data must be in one of the forms NPOTrainer reads; name what was found otherwise."""
    names = dataset.column_names
    if not any(all(c in names for c in form) for form in FORGET_FORMATS):
        forms = " or ".join("/".join(form) for form in FORGET_FORMATS)
        raise ValueError(f"{source}: forget data needs the columns {forms}; found {names}.")


def make_parser(prog: str | None = None, command: str = "npo"):
    from hf_align.trainers import NPOConfig

    return make_trl_parser(NPOConfig, prog or f"hf-align {command}", extra=(NPODataArguments,))


def run(script_args, training_args, model_args, data_args, command: str = "npo") -> int:
    from trl import get_peft_config

    from hf_align.trainers import NPOTrainer

    source = f"dataset_name {script_args.dataset_name!r}"
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
    train = split(dataset, script_args.dataset_train_split, source)
    check_forget_columns(train, source)
    retain = None
    if data_args.retain_dataset_name:
        retain_source = f"retain_dataset_name {data_args.retain_dataset_name!r}"
        retain_all = load_dataset_any(data_args.retain_dataset_name, data_args.retain_dataset_config)
        retain = split(retain_all, data_args.retain_dataset_split, retain_source)
        names = retain.column_names
        if not ("completion" in names or "text" in names or "messages" in names):
            raise ValueError(
                f"{retain_source}: retain data needs a 'completion' (with 'prompt'), 'text' or 'messages' column; "
                f"found {names}."
            )
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    trainer = NPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        retain_dataset=retain,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, training_args, script_args)
    return 0
