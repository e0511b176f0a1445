"""What ``hf-align eval`` runs (:mod:`hf_align.cli.evaluate` parses): checks before any model is loaded, then
:func:`hf_align.evaluation.evaluate_model`, the JSON and the table.
"""

from __future__ import annotations

from typing import Any


def _load_model(name: str, adapter: str | None = None):
    from hf_align.loading import load_model
    from hf_align.scripts.utils import resolve_model_path

    model = load_model(resolve_model_path(name))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def run(args) -> dict[str, Any]:
    """Evaluate as ``args`` (:class:`hf_align.cli.evaluate.EvalArguments`) asks; returns what the JSON holds."""
    from hf_align.evaluation import eval_prompts, evaluate_model, format_table, retain_format
    from hf_align.io import write_json
    from hf_align.loading import check_gguf_inputs, load_tokenizer
    from hf_align.progress import progress_enabled
    from hf_align.rewards import check_reward_weights, resolve_reward_funcs
    from hf_align.scripts.utils import load_split, refuse_existing_output, resolve_model_path

    refuse_existing_output(args.output_file, "--output_file", args.overwrite)
    check_gguf_inputs(args.model_name_or_path, args.reference_model)  # a bad .gguf before anything is loaded
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
