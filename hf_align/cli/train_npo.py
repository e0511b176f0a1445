"""``hf-align npo``: negative preference optimization (forget completions), token-weighted and neuron-masked.

Forget data (``dataset_name``): prompt-completion (standard or conversational), or a preference dataset whose
``rejected`` is the completion to forget; ``completion_weights`` / ``rejected_weights`` (e.g. from
``hf-align label-tokens``) weight its tokens. ``retain_dataset_name`` adds NPOConfig's retain term
(``retain_loss_type``, ``retain_weight``) on data to keep. ``neuron_mask_path`` (a folder from
``hf-align select-mask``) restricts the update to the selected neurons (ALLO's forgetting stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_align.cli.common import load_dataset_any, make_trl_parser, split, train_command


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


def make_parser(prog: str | None = None, command: str = "npo"):
    from hf_align.trainers.npo import NPOConfig

    return make_trl_parser(NPOConfig, prog or f"hf-align {command}", extra=(NPODataArguments,), mixture=True)


def run(script_args, training_args, model_args, dataset_args, data_args, command: str = "npo") -> int:
    """The forget data is TRL's (``dataset_name`` or a ``datasets:`` mixture); NPOTrainer checks the columns."""
    from hf_align.trainers import NPOTrainer

    retain = None
    if data_args.retain_dataset_name:
        retain_all = load_dataset_any(data_args.retain_dataset_name, data_args.retain_dataset_config)
        source = f"retain_dataset_name {data_args.retain_dataset_name!r}"
        retain = split(retain_all, data_args.retain_dataset_split, source)
        names = retain.column_names  # NPOTrainer checks the forget data, not yet the retain data
        if not ("completion" in names or "text" in names or "messages" in names):
            raise ValueError(
                f"{source}: retain data needs a 'completion' (with 'prompt'), 'text' or 'messages' column; "
                f"found {names}."
            )
    return train_command(NPOTrainer, script_args, training_args, model_args, dataset_args, retain_dataset=retain)
