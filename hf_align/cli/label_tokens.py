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

from hf_align.config_checks import AT_LEAST_ONE, UNIT, CheckedConfig, option


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


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    (args,) = parse_command("hf-align label-tokens", (LabelArguments,), argv, renamed=RENAMED, description=__doc__)
    from hf_align.scripts.label_tokens import label

    labeled, column = label(args)
    weights = [w for row in labeled[column] for w in row]
    key = sum(1 for w in weights if w != 0)
    print(
        f"labeled {len(labeled)} rows: {key} of {len(weights)} tokens have a non-zero weight in {column!r}; "
        f"written to {args.output_file}"
    )
    return 0
