"""``hf-align masked-dpo``: DPO on a neuron mask with token weights (ALLO's improving stage).

Parses what ``trl dpo`` parses (TRL's ``ScriptArguments``, ``ModelConfig``, ``DatasetMixtureConfig``) plus
``MaskedDPOConfig``'s own fields, so every ``trl dpo`` recipe runs here unchanged.
"""

from __future__ import annotations

from hf_align.cli.common import make_trl_parser, train_command


def make_parser(prog: str | None = None, command: str = "masked-dpo"):
    from hf_align.trainers.masked_dpo import MaskedDPOConfig

    return make_trl_parser(MaskedDPOConfig, prog or f"hf-align {command}", mixture=True)


def run(script_args, training_args, model_args, dataset_args, command: str = "masked-dpo") -> int:
    from hf_align.trainers import MaskedDPOTrainer

    return train_command(MaskedDPOTrainer, script_args, training_args, model_args, dataset_args)
