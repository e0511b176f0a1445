"""``hf-align label-tokens``: add a key-token weight column (``rejected_weights``) to a preference dataset.

The weights are one float per completion token under the tokenizer of the model you will train (EOS included, as
the trainers tokenize), ready for ``hf-align npo`` (the forget completion is ``rejected``) and
``hf-align masked-dpo``. Methods (:mod:`hf_align.key_tokens`):

* ``rewrite_diff`` (default): ``chosen`` is the corrected rewrite of ``rejected``; tokens it deletes or replaces
  get ``--key``, the others ``--floor``::

      hf-align label-tokens --dataset prefs.jsonl --tokenizer my/model --output labeled.jsonl

* ``generative``: ALLO's generative reward model (``--scorer``), teacher-forced on the response after a
  minimal-correction prompt; ``--selection threshold|lowest|probability``.
* ``package.module:function`` (or ``package.module.function``): any ``f(prompt, response) -> list[float]``.

``--dataset`` is a data file (``.json``/``.jsonl``/``.parquet``/``.csv``), a ``save_to_disk`` folder, a Hub id or
``testbed:preference``; ``--output`` ends in ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` and is written to a
temporary file and renamed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


OUTPUT_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-align label-tokens",
        description="Add key-token weight columns to a preference/forget dataset.",
    )
    parser.add_argument(
        "--dataset", required=True, help="Data file, save_to_disk folder, Hub id, or testbed:preference."
    )
    parser.add_argument("--dataset_config", default=None, help="Hub dataset configuration name.")
    parser.add_argument("--split", default="train", help="Split to label (default: train).")
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="Tokenizer of the model you will train (Hub id, folder, or `testbed`): weights follow its tokens.",
    )
    parser.add_argument("--output", required=True, help="Output file: .jsonl / .json (JSON lines) or .parquet.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    parser.add_argument(
        "--method",
        default="rewrite_diff",
        help="'rewrite_diff' (default), 'generative', or 'package.module:function' returning weights per token.",
    )
    parser.add_argument("--response_column", default="rejected", help="Column whose tokens are labeled.")
    parser.add_argument("--rewrite_column", default="chosen", help="rewrite_diff: the corrected rewrite's column.")
    parser.add_argument(
        "--solution_column", default="chosen", help="generative: column filling {solution} ('' to leave it empty)."
    )
    parser.add_argument(
        "--output_column", default=None, help="Weight column name (default: <response_column>_weights)."
    )
    parser.add_argument("--key", type=float, default=1.0, help="Weight of a key token.")
    parser.add_argument("--floor", type=float, default=0.0, help="Weight of every other token.")
    parser.add_argument(
        "--alignment", choices=("auto", "diff", "positional"), default="auto", help="rewrite_diff token alignment."
    )
    parser.add_argument(
        "--mark_insertions", action="store_true", help="rewrite_diff: also mark the token after an insertion."
    )
    parser.add_argument("--scorer", default=None, help="generative: the correcting causal LM (Hub id or folder).")
    parser.add_argument("--scorer_tokenizer", default=None, help="generative: its tokenizer (default: --scorer).")
    parser.add_argument(
        "--selection", choices=("threshold", "lowest", "probability"), default="threshold", help="generative."
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="generative: key if p_t < threshold.")
    parser.add_argument("--lowest_fraction", type=float, default=0.2, help="generative: key = this lowest fraction.")
    parser.add_argument(
        "--template",
        default=None,
        help="generative: scorer prompt with {problem}, {prediction} and optionally {solution} (default: ALLO's).",
    )
    parser.add_argument("--max_length", type=int, default=None, help="generative: keep the last N scorer tokens.")
    parser.add_argument("--batch_size", type=int, default=8, help="generative: scorer batch size.")
    parser.add_argument("--max_rows", type=int, default=None, help="Label only the first N rows.")
    parser.add_argument("--num_proc", type=int, default=None, help="Processes for datasets.map.")
    from hf_align.cli.common import add_kebab_aliases

    add_kebab_aliases(parser)  # the old --response-column spelling keeps working, unlisted
    return parser


def _output_format(path: Path, overwrite: bool) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix)
    if fmt is None:
        raise ValueError(
            f"--output {str(path)!r}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet."
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"--output {str(path)!r} already exists; pass --overwrite to replace it.")
    return fmt


def write_dataset(dataset, path: Path, fmt: str) -> None:
    """Write JSON lines or parquet to a temporary file beside ``path``, then rename it (hf_align.io.atomic_file)."""
    from hf_align.io import atomic_file

    with atomic_file(path, "wb") as handle:
        if fmt == "json":
            dataset.to_json(handle, lines=True, force_ascii=False)
        else:
            dataset.to_parquet(handle)


def label(args) -> tuple[object, str]:
    from transformers import AutoTokenizer

    from hf_align.cli.common import load_dataset_any, resolve_model_path, split
    from hf_align.key_tokens import GenerativeScorer, label_dataset
    from hf_align.rewards import import_callable

    output = Path(args.output)
    fmt = _output_format(output, args.overwrite)
    if args.method in ("rewrite_diff", "generative"):
        method = args.method
    elif ":" in args.method or "." in args.method:
        method = import_callable(args.method, "--method")
    else:
        raise ValueError(
            f"--method {args.method!r}: expected 'rewrite_diff', 'generative' or 'package.module:function'."
        )
    if method == "generative" and not args.scorer:
        raise ValueError("--method generative needs --scorer (the correcting causal LM).")
    source = f"--dataset {args.dataset!r}"
    data = split(load_dataset_any(args.dataset, args.dataset_config), args.split, source)
    if args.max_rows is not None:
        data = data.select(range(min(args.max_rows, len(data))))
    output_column = args.output_column or f"{args.response_column}_weights"
    if output_column in data.column_names:
        raise ValueError(f"{source}: already has a column {output_column!r}; choose another --output_column.")
    needed = ["prompt", args.response_column]
    if method == "rewrite_diff":
        needed.append(args.rewrite_column)
    if method == "generative" and args.solution_column:
        needed.append(args.solution_column)
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {data.column_names}.")

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer))
    kwargs: dict = dict(response_column=args.response_column, output_column=output_column, num_proc=args.num_proc)
    if method == "rewrite_diff":
        kwargs.update(
            rewrite_column=args.rewrite_column,
            key=args.key,
            floor=args.floor,
            alignment=args.alignment,
            mark_insertions=args.mark_insertions,
        )
    elif method == "generative":
        scorer_path = resolve_model_path(args.scorer)
        kwargs.update(
            solution_column=args.solution_column or None,
            batch_size=args.batch_size,
            scorer=GenerativeScorer(
                scorer_path,
                resolve_model_path(args.scorer_tokenizer or args.scorer),
                selection=args.selection,
                threshold=args.threshold,
                lowest_fraction=args.lowest_fraction,
                key=args.key,
                floor=args.floor,
                batch_size=args.batch_size,
                max_length=args.max_length,
                **({"template": args.template} if args.template is not None else {}),
            ),
        )
        kwargs.pop("num_proc")
    labeled = label_dataset(data, tokenizer, method, **kwargs)
    write_dataset(labeled, output, fmt)
    return labeled, output_column


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_rows is not None and args.max_rows < 1:
        parser.error(f"--max_rows must be a positive integer, got {args.max_rows}.")
    try:
        labeled, column = label(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"hf-align label-tokens: {err}", file=sys.stderr)
        return 2
    weights = [w for row in labeled[column] for w in row]
    key = sum(1 for w in weights if w != 0)
    print(
        f"labeled {len(labeled)} rows: {key} of {len(weights)} tokens have a non-zero weight in {column!r}; "
        f"written to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
