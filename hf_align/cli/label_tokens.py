"""``hf-align label-tokens``: add a key-token weight column (``rejected_weights``) to a preference dataset.

The weights are one float per completion token under the tokenizer of the model you will train (EOS included, as
the trainers tokenize), ready for ``hf-align npo`` (the forget completion is ``rejected``) and
``hf-align masked-dpo``. Methods (:mod:`hf_align.key_tokens`):

* ``rewrite_diff`` (default): ``chosen`` is the corrected rewrite of ``rejected``; tokens it deletes or replaces
  get ``--key``, the others ``--floor``::

      hf-align label-tokens --dataset_name prefs.jsonl --model_name_or_path my/model --output_file labeled.jsonl

* ``generative``: ALLO's generative reward model (``--scorer``), teacher-forced on the response after a
  minimal-correction prompt; ``--selection threshold|lowest|probability``.
* ``package.module:function`` (or ``package.module.function``): any ``f(prompt, response) -> list[float]``.

``--dataset_name`` is a data file (``.json``/``.jsonl``/``.parquet``/``.csv``), a ``save_to_disk`` folder, a Hub id or
``testbed:preference``; ``--output_file`` ends in ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` and is written to a
temporary file and renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hf_align.config_checks import AT_LEAST_ONE, UNIT, CheckedConfig, option
from hf_align.errors import UserError


OUTPUT_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
RENAMED = {"--dataset": "--dataset_name", "--tokenizer": "--model_name_or_path", "--output": "--output_file"}
RENAMED["--split"] = "--dataset_split"


@dataclass
class LabelArguments(CheckedConfig):
    """What to label, with which tokenizer and method, and where the labeled data goes."""

    dataset_name: str = option(help="Data file, save_to_disk folder, Hub id, or testbed:preference.")
    model_name_or_path: str = option(
        help="The model you will train (Hub id, folder, or `testbed`): weights follow its tokens."
    )
    output_file: str = option(help="Output file: .jsonl / .json (JSON lines) or .parquet.")
    dataset_config: str | None = option(None, help="Hub dataset configuration name.")
    dataset_split: str = option("train", help="Split to label.")
    overwrite: bool = option(False, help="Replace --output_file if it exists.")
    method: str = option(
        "rewrite_diff", help="'rewrite_diff', 'generative', or 'package.module:function' returning weights per token."
    )
    response_column: str = option("rejected", help="Column whose tokens are labeled.")
    rewrite_column: str = option("chosen", help="rewrite_diff: the corrected rewrite's column.")
    solution_column: str = option("chosen", help="generative: column filling {solution} ('' to leave it empty).")
    output_column: str | None = option(None, help="Weight column name (default: <response_column>_weights).")
    key: float = option(1.0, help="Weight of a key token.")
    floor: float = option(0.0, help="Weight of every other token.")
    alignment: str = option("auto", help="rewrite_diff token alignment.", choices=("auto", "diff", "positional"))
    mark_insertions: bool = option(False, help="rewrite_diff: also mark the token after an insertion.")
    scorer: str | None = option(None, help="generative: the correcting causal LM (id or folder).")
    scorer_tokenizer: str | None = option(None, help="generative: its tokenizer (default: scorer).")
    selection: str = option("threshold", help="generative.", choices=("threshold", "lowest", "probability"))
    threshold: float = option(0.5, help="generative: key if p_t < threshold.", range=UNIT)
    lowest_fraction: float = option(0.2, help="generative: key = this lowest fraction.", range=UNIT)
    template: str | None = option(
        None, help="generative: scorer prompt with {problem}, {prediction} and optionally {solution}."
    )
    max_length: int | None = option(None, help="generative: keep the last N scorer tokens.", range=AT_LEAST_ONE)
    batch_size: int = option(8, help="generative: scorer batch size.", range=AT_LEAST_ONE)
    max_rows: int | None = option(None, help="Label only the first N rows.", range=AT_LEAST_ONE)
    num_proc: int | None = option(None, help="Processes for datasets.map.")


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


def _method(args: LabelArguments):
    from hf_align.rewards import import_callable

    if args.method in ("rewrite_diff", "generative"):
        if args.method == "generative" and not args.scorer:
            raise UserError("--method generative needs --scorer (the correcting causal LM).")
        return args.method
    if ":" in args.method or "." in args.method:
        return import_callable(args.method, "--method")
    raise UserError(f"--method {args.method!r}: expected 'rewrite_diff', 'generative' or 'package.module:function'.")


def _method_kwargs(args: LabelArguments, method) -> dict:
    from hf_align.cli.common import resolve_model_path
    from hf_align.key_tokens import GenerativeScorer

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


def label(args: LabelArguments) -> tuple[object, str]:
    from hf_align.cli.common import load_split, require_columns, resolve_model_path
    from hf_align.key_tokens import label_dataset
    from hf_align.loading import load_tokenizer

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


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    (args,) = parse_command("hf-align label-tokens", (LabelArguments,), argv, renamed=RENAMED, description=__doc__)
    labeled, column = label(args)
    weights = [w for row in labeled[column] for w in row]
    key = sum(1 for w in weights if w != 0)
    print(
        f"labeled {len(labeled)} rows: {key} of {len(weights)} tokens have a non-zero weight in {column!r}; "
        f"written to {args.output_file}"
    )
    return 0
