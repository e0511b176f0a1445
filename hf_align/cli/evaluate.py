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
from typing import Any

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


RENAMED = {
    "--no_progress": "--disable_tqdm",
    "--output": "--output_file",
    "--retain_dataset": "--retain_dataset_name",
    "--retain_split": "--retain_dataset_split",
}


def _load_model(name: str, adapter: str | None = None):
    from hf_align.cli.common import resolve_model_path
    from hf_align.loading import load_model

    model = load_model(resolve_model_path(name))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def run(args: EvalArguments) -> dict[str, Any]:
    from hf_align.cli.common import load_split, refuse_existing_output, resolve_model_path
    from hf_align.evaluation import eval_prompts, evaluate_model, format_table, retain_format
    from hf_align.io import write_json
    from hf_align.loading import load_tokenizer
    from hf_align.progress import progress_enabled
    from hf_align.rewards import check_reward_weights, resolve_reward_funcs

    refuse_existing_output(args.output_file, "--output_file", args.overwrite)
    # Cheap checks first: a bad reward name or column fails before any model is loaded.
    funcs, names = resolve_reward_funcs(args.reward) if args.reward else ([], [])
    if args.reward_weights is not None:
        check_reward_weights(args.reward_weights, len(funcs))
    dataset = load_split(args.dataset_name, args.dataset_split, "dataset_name", args.dataset_config, args.num_prompts)
    prompts, extra = eval_prompts(dataset, args.prompt_column, f"dataset_name {args.dataset_name!r}")
    retain = None
    if args.retain_dataset_name:
        retain = load_split(
            args.retain_dataset_name, args.retain_dataset_split, "retain_dataset_name", limit=args.num_retain
        )
        retain_format(retain.column_names, f"retain_dataset_name {args.retain_dataset_name!r}")  # before any model

    tokenizer = load_tokenizer(resolve_model_path(args.model_name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_model(args.model_name_or_path, args.adapter)
    reference, reference_name = None, args.reference_model
    if reference_name is not None:
        reference = _load_model(reference_name)
    elif args.adapter is not None:
        reference, reference_name = _load_model(args.model_name_or_path), f"{args.model_name_or_path} (no adapter)"
    generation = {"seed": args.seed, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    generation["batch_size"] = args.batch_size
    metrics = evaluate_model(
        model,
        tokenizer,
        prompts,
        reward_funcs=funcs,
        reward_names=names,
        reference_model=reference,
        retain=retain,
        reward_columns=extra,
        progress=progress_enabled(),
        reward_weights=args.reward_weights,
        **generation,
    )
    result = {
        "model": args.model_name_or_path,
        "adapter": args.adapter,
        "reference_model": reference_name,
        "dataset": {"name": args.dataset_name, "split": args.dataset_split, "prompt_column": args.prompt_column},
        "retain_dataset": args.retain_dataset_name,
        "reward": names,
        "reward_weights": args.reward_weights,
        "generation": generation,
        "metrics": metrics,
    }
    write_json(args.output_file, result)
    print(format_table(metrics))
    print(f"results written to {args.output_file}")
    return result


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    (args,) = parse_command("hf-align eval", (EvalArguments,), argv, renamed=RENAMED, description=__doc__)
    run(args)
    return 0
