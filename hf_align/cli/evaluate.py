"""``hf-align eval``: does a model (or adapter) align? Reward, win rate, KL, retain perplexity, length.

    hf-align eval --model_name_or_path out/dpo --dataset_name testbed:prompts --reward testbed \\
        --reference_model testbed --retain_dataset_name testbed:retain --output_file results.json

* ``--reward``: ``testbed``, ``package.module:function`` or ``package.module.function`` (a TRL-GRPO-style
  ``f(prompts, completions, **kw)``) or a reward-model folder/Hub id (:mod:`hf_align.rewards`: scored as in
  TRL's GRPO and in ``hf-align feedback``, chat template included); several are each reported by name, and
  their weighted sum only with ``--reward_weights``.
* ``--reference_model``: win rate (its samples on the same prompts with the same seed) and
  KL(policy‖reference) on the policy's samples. With ``--adapter`` and no reference, the base model is the
  reference.
* ``--retain_dataset_name``: perplexity on any format the trainers take (``text``/``messages``, ``prompt`` +
  ``completion`` or ``chosen``; strings or messages), see :func:`hf_align.evaluation.retain_texts`.

Same arguments and seed ⇒ the same JSON, byte for byte. The JSON is written atomically; a table is printed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_align.config_checks import AT_LEAST_ONE, CheckedConfig, option


@dataclass
class EvalArguments(CheckedConfig):
    """What to evaluate, on what, and where the JSON goes."""

    model_name_or_path: str = option(help="Model folder, Hub id or 'testbed'.")
    dataset_name: str = option(help="Prompts: testbed:prompts, a data file, a folder or Hub id.")
    output_file: str = option(help="JSON file for the results (refused if it exists).")
    adapter: str | None = option(None, help="PEFT adapter folder applied on top of the model.")
    dataset_config: str | None = option(None, help="Hub dataset config name.")
    dataset_split: str = option("train", help="Split with the prompts.")
    prompt_column: str = option("prompt", help="Column with the prompts (strings or messages).")
    num_prompts: int | None = option(None, help="Use only the first N prompts.", range=AT_LEAST_ONE)
    reward: list[str] | None = option(
        None, help="'testbed', 'package.module:function' or a reward model; several are each reported by name."
    )
    reward_weights: list[float] | None = option(None, help="One weight per --reward: report their weighted sum.")
    reference_model: str | None = option(None, help="Reference for win rate and KL (folder, id, 'testbed').")
    retain_dataset_name: str | None = option(None, help="Held-out set for perplexity (testbed:retain, file, ...).")
    retain_dataset_split: str = option("train", help="Split of retain_dataset_name.")
    num_retain: int | None = option(None, help="Use only the first N retain rows.", range=AT_LEAST_ONE)
    max_new_tokens: int = option(64, help="Tokens sampled per prompt.", range=AT_LEAST_ONE)
    temperature: float = option(1.0, help="Sampling temperature.")
    batch_size: int = option(64, help="Prompts per generation batch.", range=AT_LEAST_ONE)
    seed: int = option(0, help="Sampling seed (batch i uses seed + i).")
    overwrite: bool = option(False, help="Replace an existing --output_file.")
    no_progress: bool = option(False, help="Hide the progress bars.")


RENAMED = {
    "--output": "--output_file",
    "--retain_dataset": "--retain_dataset_name",
    "--retain_split": "--retain_dataset_split",
}


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    (args,) = parse_command("hf-align eval", (EvalArguments,), argv, renamed=RENAMED, description=__doc__)
    from hf_align.scripts.evaluate import run

    run(args)
    return 0
