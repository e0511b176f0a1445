"""What ``hf-align label-tokens`` runs (:mod:`hf_align.cli.label_tokens` parses): check the output, the method
and the columns, then :func:`hf_align.key_tokens.label_dataset` and an atomic write.
"""

from __future__ import annotations

from pathlib import Path

from hf_align.errors import UserError


OUTPUT_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _output_format(path: Path, overwrite: bool) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix)
    if fmt is None:
        raise UserError(
            f"--output_file {str(path)!r}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet."
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"--output_file {str(path)!r} already exists; pass --overwrite to replace it.")
    return fmt


def write_dataset(dataset, path: Path, fmt: str) -> None:
    """Write JSON lines or parquet to a temporary file beside ``path``, then rename it (hf_align.io.atomic_file)."""
    from hf_align.io import atomic_file

    with atomic_file(path, "wb") as handle:
        if fmt == "json":
            dataset.to_json(handle, lines=True, force_ascii=False)
        else:
            dataset.to_parquet(handle)


def _method(args):
    from hf_align.rewards import import_callable

    if args.method in ("rewrite_diff", "generative"):
        if args.method == "generative" and not args.scorer:
            raise UserError("--method generative needs --scorer (the correcting causal LM).")
        return args.method
    if ":" in args.method or "." in args.method:
        return import_callable(args.method, "--method")
    raise UserError(f"--method {args.method!r}: expected 'rewrite_diff', 'generative' or 'package.module:function'.")


def _method_kwargs(args, method) -> dict:
    from hf_align.key_tokens import GenerativeScorer
    from hf_align.scripts.utils import resolve_model_path

    if method == "rewrite_diff":
        keys = ("rewrite_column", "key", "floor", "alignment", "mark_insertions", "num_proc")
        return {name: getattr(args, name) for name in keys}
    if method != "generative":
        return {"num_proc": args.num_proc}
    scorer = GenerativeScorer(
        resolve_model_path(args.scorer),
        resolve_model_path(args.scorer_tokenizer or args.scorer),
        selection=args.selection,
        threshold=args.threshold,
        lowest_fraction=args.lowest_fraction,
        key=args.key,
        floor=args.floor,
        batch_size=args.batch_size,
        max_length=args.max_length,
        **({"template": args.template} if args.template is not None else {}),
    )
    return {"solution_column": args.solution_column or None, "batch_size": args.batch_size, "scorer": scorer}


def label(args) -> tuple[object, str]:
    """Label and write as ``args`` (:class:`hf_align.cli.label_tokens.LabelArguments`) asks: (the labeled data, its
    weight column)."""
    from hf_align.key_tokens import label_dataset
    from hf_align.loading import load_tokenizer
    from hf_align.scripts.utils import load_split, require_columns, resolve_model_path

    output = Path(args.output_file)
    fmt = _output_format(output, args.overwrite)
    method = _method(args)
    data = load_split(args.dataset_name, args.dataset_split, "--dataset_name", args.dataset_config, args.max_rows)
    source = f"--dataset_name {args.dataset_name!r}"
    output_column = args.output_column or f"{args.response_column}_weights"
    if output_column in data.column_names:
        raise UserError(f"{source}: already has a column {output_column!r}; choose another --output_column.")
    needed = ["prompt", args.response_column]
    needed += [args.rewrite_column] if method == "rewrite_diff" else []
    needed += [args.solution_column] if method == "generative" and args.solution_column else []
    require_columns(data, needed, source)
    tokenizer = load_tokenizer(resolve_model_path(args.model_name_or_path))
    kwargs = {"response_column": args.response_column, "output_column": output_column}
    labeled = label_dataset(data, tokenizer, method, **kwargs, **_method_kwargs(args, method))
    write_dataset(labeled, output, fmt)
    return labeled, output_column
