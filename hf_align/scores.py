"""Neuron scores: how much each parameter row (or entry) is used by alignment, and their files.

Scores are keyed by the parameter names of the *plain* model (``model.layers.3.mlp.down_proj.weight``),
like masks (see ``hf_align.masks``): a full-shape tensor scores every entry, a 1-D tensor of length
``shape[0]`` scores every output row. ``NeuronMask.from_scores`` turns them into a mask.

On disk a score set is ``neuron_scores.safetensors`` (the tensors, with the metadata also in the
safetensors header so the file describes itself) plus ``neuron_scores.json`` (the same metadata,
human-readable). Both are written atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_align.architectures import (
    checkpoint_neuron_axes,
    checkpoint_parameter_order,
    in_order,
    neuron_axis,
    row_length,
)
from hf_align.architectures import plain_name as plain_name  # re-exported: its home was here
from hf_align.config_checks import CheckedConfig, check_option, option
from hf_align.errors import UserError
from hf_align.io import (
    PARAMETER_ORDER,
    PathLike,
    atomic_files,
    check_same_save,
    load_tensors,
    new_save_id,
    read_json,
    safetensors_metadata,
    save_tensors,
    saved_order,
    write_json,
)
from hf_align.progress import progress_bar


SCORES_FILE = "neuron_scores.safetensors"
META_FILE = "neuron_scores.json"
GRANULARITIES = ("row", "element")
STATISTICS = ("abs", "square")
METHODS = ("weight_diff", "gradient")
GRAD_STAGES = ("pre_clip", "post_clip")
SCORE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ScoreOptions(CheckedConfig):
    """How neuron scores are measured during a run (``MaskAccumulationCallback``, ``hf-align warmup-dpo``'s
    ``score_*`` fields), declared once; checked when built, like every config.

    The defaults are ALLO's (``weight_diff`` over every ``element``), the same for the callback and the command.
    """

    method: str = option(
        "weight_diff",
        help="'weight_diff' (|θ_end − θ_start| at each save, ALLO; also scores a PEFT model's merged weights) or "
        "'gradient' (Σ over optimizer steps of |grad|; needs trainable base weights).",
        choices=METHODS,
    )
    granularity: str = option(
        "element",
        help="'element' (ALLO: every parameter entry is a neuron, one value per entry) or 'row' (one neuron per "
        "output row, 4 bytes per row).",
        choices=GRANULARITIES,
    )
    statistic: str = option(
        "abs", help="'abs' (Σ|x|) or 'square' (Σx²) over a row's entries (and the steps).", choices=STATISTICS
    )
    grad_stage: str = option(
        "pre_clip", help="Gradient method only: read the gradients 'pre_clip' or 'post_clip'.", choices=GRAD_STAGES
    )
    score_dtype: str = option(
        "float32",
        help="dtype of element-granularity scores (the gradient accumulators; the weight_diff scores built at each "
        "save): 'float32', or 'bfloat16' / 'float16' (half the memory).",
        choices=SCORE_DTYPES,
    )
    offload_to_cpu: bool = option(
        False, help="Keep the gradient accumulators in host memory instead of on the parameter's device."
    )


_SAVE_ID = "_save_id"  # in neuron_scores.json: which save wrote it (checked against the safetensors header)


# --------------------------------------------------------------------------------------------- file IO
def save_scores(directory: PathLike, scores: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
    """Write ``scores`` (fp32/bf16/fp16 tensors, moved to CPU) and ``meta`` into ``directory``.

    Returns the path of the safetensors file. ``meta`` must be JSON-serialisable.
    """
    if not isinstance(scores, dict) or not scores:
        raise ValueError("save_scores: `scores` must be a non-empty dict {parameter name: tensor}.")
    for name, tensor in scores.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(
                f"save_scores: score {name!r} must be a floating-point tensor, got {type(tensor).__name__}."
            )
    meta = {**(meta or {}), PARAMETER_ORDER: list(scores)}  # the files sort their keys: the caller's order, kept
    save_id = new_save_id()
    header = json.dumps(meta, sort_keys=True)  # fails early (before writing) on non-serialisable meta
    directory = Path(directory)
    path = directory / SCORES_FILE
    tensors = {k: v.detach().cpu() for k, v in scores.items()}
    with atomic_files(path, directory / META_FILE) as (tensors_tmp, meta_tmp):  # both files or neither
        save_tensors(tensors_tmp, tensors, metadata={"hf_align_scores": header, "save_id": save_id})
        write_json(meta_tmp, {**meta, _SAVE_ID: save_id})
    return path


def load_scores(
    directory: PathLike, device: str = "cpu", revision: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a score set written by :func:`save_scores` (``directory``, the safetensors file itself, or a Hub repo
    id with ``revision``: :func:`hf_align.hub.resolve_local`)."""
    from hf_align.hub_download import resolve_local

    path = resolve_local(directory, revision, [SCORES_FILE, META_FILE], what="neuron scores")
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"No neuron scores at {str(path)!r}: expected a directory containing {SCORES_FILE} "
            "(written by MaskAccumulationCallback or hf_align.scores.save_scores)."
        )
    scores = load_tensors(path, device=device)
    header = safetensors_metadata(path)
    meta_path = path.parent / META_FILE
    if meta_path.exists():
        meta = read_json(meta_path)
        check_same_save(path, meta_path, meta.pop(_SAVE_ID, None), metadata=header)
    else:
        meta_path, meta = path, json.loads(header.get("hf_align_scores", "{}"))
    return in_order(scores, saved_order(meta, meta_path)), meta


# ----------------------------------------------------------------------------------------- parameter names
def matches_target(name: str, target: str | Iterable[str] | None) -> bool:
    """``None``: every parameter; a string: a regular expression searched in the name; a list: name suffixes
    or module names (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj.weight``)."""
    if target is None:
        return True
    if isinstance(target, str):
        return re.search(target, name) is not None
    parts = name.split(".")
    return any(name.endswith(t) or t in parts for t in target)


# ---------------------------------------------------------------------------------------------- statistics
def reduce_magnitude(delta: torch.Tensor, granularity: str, statistic: str = "abs", axis: int = 0) -> torch.Tensor:
    """|delta| (or delta²) per entry, or summed per output feature ("row") in fp32; ``axis`` is the output-feature
    axis (1 for a GPT-2 ``Conv1D`` weight, see :mod:`hf_align.architectures`)."""
    check_option(ScoreOptions, "granularity", granularity, label="granularity")
    check_option(ScoreOptions, "statistic", statistic, label="statistic")
    if granularity == "element":
        out = delta.abs() if statistic == "abs" else delta.square()
        return out.float() if out.dtype != torch.float32 else out
    if axis and delta.dim() > axis:
        delta = delta.movedim(axis, 0)
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 0 else delta.reshape(1, 1)
    if statistic == "abs":
        return torch.linalg.vector_norm(rows, ord=1, dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(rows, ord=2, dim=1, dtype=torch.float32).square()


# ------------------------------------------------------------------------------------- streamed checkpoints
class CheckpointReader:
    """Read one tensor at a time from a safetensors checkpoint (a file, a folder, or a sharded folder).

    The folder is read by merge's :class:`hf_align.merging.streaming.Checkpoint` -- one reader for every command:
    what ``from_pretrained`` reads (``model.safetensors`` before an index), every header checked, and every index
    entry and file kept inside the folder (``../B/model.safetensors`` is refused).
    """

    def __init__(self, path: PathLike):
        from hf_align.merging.streaming import Checkpoint

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"Checkpoint {str(self.path)!r} does not exist (expected a directory or .safetensors file)."
            )
        self._checkpoint = Checkpoint(self.path)

    def keys(self) -> list[str]:
        return list(self._checkpoint.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._checkpoint.tensors[name].shape

    def __contains__(self, name: str) -> bool:
        return name in self._checkpoint.tensors

    def get(self, name: str) -> torch.Tensor:
        if name not in self._checkpoint.tensors:
            raise KeyError(f"Tensor {name!r} is not in checkpoint {str(self.path)!r}.")
        return self._checkpoint.read(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._checkpoint.tensors:
            yield name, self.get(name)

    def close(self) -> None:
        self._checkpoint.close()


def checkpoint_neuron_sizes(path: PathLike) -> dict[str, int]:
    """Parameters per row-neuron of every weight of a checkpoint, from its headers alone (no tensor is read): a
    row's length (GPT-2's ``Conv1D`` rows are columns), 1 for a 1-D tensor. What ``budget="params"`` needs."""
    reader = CheckpointReader(path)
    try:
        axes = checkpoint_neuron_axes(reader.path)
        sizes = {}
        for name in reader.keys():
            shape = reader.shape(name)
            sizes[name] = row_length(shape, neuron_axis(axes, name))
        return sizes
    finally:
        reader.close()


def weight_diff_scores(
    init: PathLike | CheckpointReader,
    trained: PathLike | CheckpointReader | Iterable[tuple[str, torch.Tensor]],
    granularity: str = "element",
    statistic: str = "abs",
    target: str | Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    axes: dict[str, int] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``|θ_trained − θ_init|`` per entry or summed per row, streamed one tensor at a time (ALLO's statistic);
    ``progress``: a bar, one step per tensor of ``trained`` (of ``init`` matching ``target`` for pairs).

    ``axes``: the output-feature axis of each weight not on axis 0 (:func:`hf_align.architectures.neuron_axes`);
    ``None`` reads it from the initial checkpoint's ``config.json`` (GPT-2's ``Conv1D`` rows are columns).

    The result lives in host memory: ``dtype``'s size per entry (element granularity) or 4 bytes per row.

    ``trained`` is a checkpoint or an iterable of ``(plain name, tensor)`` pairs (e.g. a live model's
    effective weights). Tensors missing from ``init`` are an error; non-float tensors are skipped.
    """
    init_reader = init if isinstance(init, CheckpointReader) else CheckpointReader(init)
    if axes is None and granularity == "row":
        axes = checkpoint_neuron_axes(init_reader.path)
    if isinstance(trained, (str, Path)):
        trained = CheckpointReader(trained)
    reader = trained if isinstance(trained, CheckpointReader) else None
    pairs = reader.items() if reader is not None else trained
    names = reader.keys() if reader is not None else [n for n in init_reader.keys() if matches_target(n, target)]
    scores: dict[str, torch.Tensor] = {}
    for name, tensor in progress_bar(
        pairs, desc="scoring weight diff", unit="tensor", total=len(names), enabled=progress
    ):
        if not tensor.is_floating_point() or not matches_target(name, target):
            continue
        if name not in init_reader:
            raise UserError(
                f"Parameter {name!r} is missing from the initial checkpoint {str(init_reader.path)!r}; "
                "both checkpoints must come from the same architecture."
            )
        start = init_reader.get(name)
        if start.shape != tensor.shape:
            raise UserError(
                f"Parameter {name!r} has shape {tuple(tensor.shape)} but {tuple(start.shape)} in {str(init_reader.path)!r}."
            )
        delta = tensor.detach().float() - start.to(device=tensor.device, dtype=torch.float32)
        score = reduce_magnitude(delta, granularity, statistic, neuron_axis(axes, name))
        scores[name] = score.to("cpu", dtype=dtype if granularity == "element" else torch.float32)
    if not scores:
        raise UserError(f"No parameter matched target={target!r}; nothing to score.")
    return scores if reader is None else in_order(scores, checkpoint_parameter_order(init_reader.path))
