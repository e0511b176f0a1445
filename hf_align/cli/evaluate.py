"""``hf-align eval``: does a model (or adapter) align? Reward, win rate, KL, retain perplexity, length.

    hf-align eval --model_name_or_path out/dpo --dataset_name testbed:prompts --reward testbed \\
        --reference_model testbed --retain_dataset testbed:retain --output results.json

* ``--reward``: ``testbed``, ``package.module:function`` or ``package.module.function`` (a TRL-GRPO-style
  ``f(prompts, completions, **kw)``) or a reward-model folder/Hub id (:mod:`hf_align.rewards`: scored as in
  TRL's GRPO and in ``hf-align feedback``, chat template included); repeat it for several, each reported by
  name; ``--reward_weights`` adds their weighted sum.
* ``--reference_model``: win rate (its samples on the same prompts with the same seed) and
  KL(policy‖reference) on the policy's samples. With ``--adapter`` and no reference, the base model is the
  reference.
* ``--retain_dataset``: perplexity on any format the trainers take (``text``/``messages``, ``prompt`` +
  ``completion`` or ``chosen``; strings or messages), see :func:`hf_align.evaluation.retain_texts`.

Same arguments and seed ⇒ the same JSON, byte for byte. The JSON is written atomically; a table is printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-align eval",
        description="Evaluate a model: mean reward, win rate and KL vs a reference, retain perplexity, length.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="Model folder, Hub id or 'testbed'.")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder applied on top of the model.")
    parser.add_argument(
        "--dataset_name", required=True, help="Prompts: testbed:prompts, a data file, a folder or Hub id."
    )
    parser.add_argument("--dataset_config", default=None, help="Hub dataset config name.")
    parser.add_argument("--dataset_split", default="train", help="Split with the prompts.")
    parser.add_argument("--prompt_column", default="prompt", help="Column with the prompts (strings or messages).")
    parser.add_argument("--num_prompts", type=int, default=None, help="Use only the first N prompts.")
    parser.add_argument(
        "--reward",
        action="append",
        default=None,
        help="'testbed', 'package.module:function' or a reward model; repeat for several (each reported by name).",
    )
    parser.add_argument(
        "--reward_weights", type=float, nargs="+", default=None, help="One weight per --reward: report their sum."
    )
    parser.add_argument(
        "--reference_model", default=None, help="Reference for win rate and KL (folder, id, 'testbed')."
    )
    parser.add_argument(
        "--retain_dataset", default=None, help="Held-out set for perplexity (testbed:retain, file, ...)."
    )
    parser.add_argument("--retain_split", default="train")
    parser.add_argument("--num_retain", type=int, default=None, help="Use only the first N retain rows.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (batch i uses seed + i).")
    parser.add_argument("--output", required=True, help="JSON file for the results (refused if it exists).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    return parser


def _load_model(name: str, adapter: str | None = None):
    from transformers import AutoModelForCausalLM

    from hf_align.cli.common import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _load_split(name: str, split_name: str, limit: int | None, source: str, config: str | None = None):
    from hf_align.cli.common import load_dataset_any, split

    dataset = split(load_dataset_any(name, config), split_name, source)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{source} {name!r}: no rows in split {split_name!r}.")
    return dataset


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from hf_align.cli.common import refuse_existing_output, resolve_model_path
    from hf_align.evaluation import eval_prompts, evaluate_model, format_table, retain_format
    from hf_align.io import write_json
    from hf_align.rewards import check_reward_weights, resolve_reward_funcs

    refuse_existing_output(args.output, "--output", args.overwrite)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError(f"--num_prompts must be ≥ 1, got {args.num_prompts}.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be ≥ 1, got {args.max_new_tokens}.")
    # Cheap checks first: a bad reward name or column fails before any model is loaded.
    funcs, names = resolve_reward_funcs(args.reward) if args.reward else ([], [])
    if args.reward_weights is not None:
        check_reward_weights(args.reward_weights, len(funcs))
    dataset = _load_split(args.dataset_name, args.dataset_split, args.num_prompts, "dataset_name", args.dataset_config)
    prompts, extra = eval_prompts(dataset, args.prompt_column, f"dataset_name {args.dataset_name!r}")
    retain = None
    if args.retain_dataset:
        retain = _load_split(args.retain_dataset, args.retain_split, args.num_retain, "retain_dataset")
        retain_format(retain.column_names, f"retain_dataset {args.retain_dataset!r}")  # before any model loads

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model_name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_model(args.model_name_or_path, args.adapter)
    reference = None
    reference_name = args.reference_model
    if reference_name is not None:
        reference = _load_model(reference_name)
    elif args.adapter is not None:
        reference, reference_name = _load_model(args.model_name_or_path), f"{args.model_name_or_path} (no adapter)"

    metrics = evaluate_model(
        model,
        tokenizer,
        prompts,
        reward_funcs=funcs,
        reward_names=names,
        reference_model=reference,
        retain=retain,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        reward_columns=extra,
        progress=not args.no_progress,
        reward_weights=args.reward_weights,
    )
    result = {
        "model": args.model_name_or_path,
        "adapter": args.adapter,
        "reference_model": reference_name,
        "dataset": {"name": args.dataset_name, "split": args.dataset_split, "prompt_column": args.prompt_column},
        "retain_dataset": args.retain_dataset,
        "reward": names,
        "reward_weights": args.reward_weights,
        "generation": {
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "batch_size": args.batch_size,
        },
        "metrics": metrics,
    }
    write_json(args.output, result)
    print(format_table(metrics))
    print(f"results written to {args.output}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"hf-align eval: {err}", file=sys.stderr)
        return 2
    return 0
