"""The figures a researcher looks at first: where a mask lands, what a merge weighs, how a run trained.

* :func:`mask_figure` / :func:`plot_selection_heatmap` — neurons trained and fraction per decoder layer × module
  type, modules in the model's order (ALLO's figure 1).
* :func:`plot_score_distribution` — histogram of the neuron scores (log scale), with the selection threshold.
* :func:`alpha_figure` / :func:`plot_merge_alphas` — α per block of a merge plan or of adaptive AMA's learned α's.
* :func:`reward_kl_figure`, :func:`forget_retain_figure`, :func:`quantile_figure` — curves and pool histograms read
  from a ``trainer.state.log_history``; :func:`write_training_plots` writes every one that has data.

Each ``*_figure`` returns a matplotlib ``Figure`` (tests read its axes); ``plot_*`` write it as PNG. matplotlib is
the optional extra ``plots`` (``pip install 'hf-align[plots]'``), imported only when a figure is drawn; files are
written atomically and no display is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_align.io import PathLike, atomic_file


MASK_PLOT_FILE = "mask_plot.png"
ALPHA_PLOT_FILE = "merge_alphas.png"
REWARD_PLOT_FILE = "reward_kl.png"
FORGET_RETAIN_PLOT_FILE = "forget_retain.png"
QUANTILE_PLOT_FILE = "pool_quantiles.png"

# Module types in the order a decoder layer runs them (Llama/Qwen/Mistral, GPT-2, GPT-NeoX, Phi): the column order
# when no parameter names in model order are given (a saved mask lists its tensors alphabetically).
_MODULE_ORDER = (
    "embed_tokens", "wte", "wpe", "embed_in", "input_layernorm", "ln_1", "q_proj", "k_proj", "v_proj", "qkv_proj",
    "query_key_value", "c_attn", "Wqkv", "o_proj", "out_proj", "dense", "post_attention_layernorm", "ln_2",
    "gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "dense_h_to_4h", "down_proj", "fc2", "dense_4h_to_h",
    "c_proj", "norm", "ln_f", "final_layer_norm", "lm_head", "embed_out",
)  # fmt: skip


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Plotting needs matplotlib: install it with `pip install 'hf-align[plots]'` (or `pip install matplotlib`)."
        ) from None
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def matplotlib_available() -> bool:
    """Whether the optional ``plots`` extra is installed (checked without importing matplotlib)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def save_figure(figure, path: PathLike) -> Path:
    """``figure`` as a PNG at ``path``, written atomically."""
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", bbox_inches="tight")
    return path


# ---- masks --------------------------------------------------------------------------------------------------


def _module_type(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else parts[-1]


def module_order(modules: Iterable[str], order: Iterable[str] | None = None) -> list[str]:
    """``modules`` in the model's order: their first appearance in ``order`` (parameter names as
    ``model.named_parameters()`` lists them), else the usual order of a decoder layer; unknown ones after, as given."""
    modules = list(dict.fromkeys(modules))
    if order is not None:
        rank = {m: i for i, m in reversed(list(enumerate(_module_type(n) for n in order)))}
    else:
        rank = {m: i for i, m in enumerate(_MODULE_ORDER)}
    return sorted(modules, key=lambda m: (rank.get(m, len(rank)), modules.index(m)))


def layer_module_grid(selection: Any, order: Iterable[str] | None = None) -> dict[str, Any]:
    """The mask plot's data: ``layers`` (ints, then ``None`` for embeddings/head), ``modules`` (model order),
    ``fraction[i][j]`` and, for a ``NeuronMask``, ``selected[i][j]`` (neurons trained; NaN where a layer lacks
    that module)."""
    counts = selection.per_layer_counts() if hasattr(selection, "per_layer_counts") else None
    if counts is not None:
        fractions = {key: s / t for key, (s, t) in counts.items()}
    else:
        fractions = selection.per_layer_fraction() if hasattr(selection, "per_layer_fraction") else selection
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(
            "plot_selection_heatmap expects a NeuronMask or a non-empty {(layer_idx, module_type): fraction} mapping."
        )
    layers: list[int | None] = sorted({layer for layer, _ in fractions if layer is not None})
    if any(layer is None for layer, _ in fractions):
        layers.append(None)
    modules = module_order((module for _, module in fractions), order)
    grid = {
        "layers": layers,
        "modules": modules,
        "fraction": [[fractions.get((layer, m), math.nan) for m in modules] for layer in layers],
    }
    if counts is not None:
        grid["selected"] = [
            [counts[(layer, m)][0] if (layer, m) in counts else math.nan for m in modules] for layer in layers
        ]
    return grid


def mask_figure(selection: Any, order: Iterable[str] | None = None, title: str | None = None):
    """Rows (or entries, for element masks) trained and fraction trained per decoder layer × module type, modules in
    model order.

    ``selection``: a ``NeuronMask`` or a ``{(layer_idx, module_type): fraction}`` mapping (then only the fraction
    panel). Layer ``None`` (embeddings, final norm, ``lm_head``) is the ``other`` row at the bottom. For row masks
    the fraction of rows is the fraction of the weight's parameters (every row has the same length)."""
    grid = layer_module_grid(selection, order)
    layers, modules = grid["layers"], grid["modules"]
    unit = "entries" if getattr(selection, "granularity", "row") == "element" else "rows"
    panels = [("selected", f"{unit} trained", "magma"), ("fraction", "fraction trained", "viridis")]
    panels = [panel for panel in panels if panel[0] in grid]
    width = max(4.0, 0.6 * len(modules) + 2.5)
    figure = _figure(width * len(panels), max(3.0, 0.3 * len(layers) + 1.5))
    row_labels = ["other" if layer is None else str(layer) for layer in layers]
    for i, (key, label, cmap) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        image = axes.imshow(grid[key], aspect="auto", cmap=cmap, vmin=0.0, interpolation="nearest")
        axes.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        axes.set_yticks(range(len(layers)), row_labels)
        axes.set_xlabel("module type (model order)")
        axes.set_ylabel("layer")
        axes.set_title(label)
        figure.colorbar(image, ax=axes, label=label)
    figure.suptitle(title or "Neuron mask per layer × module type")
    return figure


def plot_selection_heatmap(
    selection: Any, path: PathLike, title: str | None = None, order: Iterable[str] | None = None
) -> Path:
    """:func:`mask_figure` written as a PNG at ``path``."""
    return save_figure(mask_figure(selection, order, title), path)


def mask_plot_for_card(mask: Any, folder: PathLike, order: Iterable[str] | None = None) -> str | None:
    """Write :data:`MASK_PLOT_FILE` into ``folder`` (a card's folder) and return its name for the card's link
    (``hub.mask_summary(mask, plot=...)``); None, and nothing written, without matplotlib."""
    if not matplotlib_available():
        return None
    return plot_selection_heatmap(mask, Path(folder) / MASK_PLOT_FILE, order=order).name


def score_sample(scores: Mapping[str, torch.Tensor], max_points: int = 1_000_000) -> torch.Tensor:
    """An evenly strided sample of all score values (fp32, CPU), at most about ``max_points`` long."""
    total = sum(t.numel() for t in scores.values())
    if total == 0:
        raise ValueError("No score values to plot.")
    stride = max(1, math.ceil(total / max_points))
    return torch.cat([t.detach().reshape(-1)[::stride].float().cpu() for t in scores.values()])


def plot_score_distribution(
    scores: Mapping[str, torch.Tensor],
    path: PathLike,
    threshold: float | None = None,
    bins: int = 100,
    title: str | None = None,
) -> Path:
    """Histogram of log10(score) over all (sampled) scores; zeros are counted in the title, ``threshold`` drawn."""
    values = score_sample(scores)
    positive = values[values > 0]
    figure = _figure(6.0, 3.5)
    axes = figure.add_subplot(1, 1, 1)
    if positive.numel():
        axes.hist(positive.log10().numpy(), bins=bins, color="tab:blue")
    if threshold is not None and threshold > 0:
        axes.axvline(math.log10(threshold), color="tab:red", linestyle="--", label="selection threshold")
        axes.legend()
    zeros = values.numel() - positive.numel()
    axes.set_xlabel("log10(score)")
    axes.set_ylabel("count")
    axes.set_yscale("log")
    axes.set_title(title or f"Score distribution ({values.numel():,} values sampled, {zeros:,} zero)")
    return save_figure(figure, path)


# ---- merges ------------------------------------------------------------------------------------------------


def alpha_blocks(source: Any) -> dict[str, float]:
    """``{block label: α}`` in model order from a ``MergePlan`` (its tensors grouped by decoder layer, embeddings
    first, head last; a block's α is the mean of its tensors'), adaptive AMA's ``LearnedAlphas``, or such a mapping."""
    if hasattr(source, "block_alphas"):
        return {
            **{f"block {i}": float(a) for i, a in enumerate(source.block_alphas)},
            "lm_head": float(source.head_alpha),
        }
    if hasattr(source, "alphas") and isinstance(source.alphas, Mapping):
        from hf_align.architectures import layer_index
        from hf_align.merging.plan import tensor_role

        groups: dict[tuple[int, int], list[float]] = {}
        roles = ("embed", "layer", "final_norm", "head", "other")
        for name, alpha in source.alphas.items():
            layer, role = layer_index(name), tensor_role(name)
            groups.setdefault((roles.index(role), layer if layer is not None else 0), []).append(float(alpha))
        return {
            (f"layer {index}" if roles[rank] == "layer" else roles[rank]): sum(values) / len(values)
            for (rank, index), values in sorted(groups.items())
        }
    if isinstance(source, Mapping) and source:
        return {str(k): float(v) for k, v in source.items()}
    raise ValueError("alpha_figure expects a MergePlan, LearnedAlphas or a non-empty {block: alpha} mapping.")


def alpha_figure(source: Any, init: float | None = None, title: str | None = None):
    """Bars of α per block (α weighs the base model: θ = α·θ_base + (1−α)·θ_aligned); ``init`` drawn as a line."""
    blocks = alpha_blocks(source)
    figure = _figure(max(4.0, 0.35 * len(blocks) + 2.0), 3.5)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(blocks)), list(blocks.values()), color="tab:purple")
    axes.set_xticks(range(len(blocks)), list(blocks), rotation=60, ha="right")
    if init is not None:
        axes.axhline(init, color="tab:gray", linestyle="--", label=f"start α={init:g}")
        axes.legend()
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("block")
    axes.set_ylabel("α (weight of the base model)")
    axes.set_title(title or getattr(source, "description", None) or "Merge α per block")
    return figure


def plot_merge_alphas(source: Any, path: PathLike, init: float | None = None, title: str | None = None) -> Path:
    """:func:`alpha_figure` written as a PNG at ``path``."""
    return save_figure(alpha_figure(source, init, title), path)


# ---- training curves (from trainer.state.log_history) ---------------------------------------------------------

REWARD_KEYS = ("reward", "rewards/chosen", "rewards/rejected", "rewards/margins")
KL_KEYS = ("kl", "forget/logratio")
FORGET_RETAIN_KEYS = ("forget/loss", "retain/loss", "forget/nll")
_QUANTILE = re.compile(r"^pool/(quantile|category)_(\d+)$")


def log_series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the training logs that hold ``key`` (evaluation logs are prefixed ``eval_``)."""
    points = [(int(e.get("step", i)), float(e[key])) for i, e in enumerate(log_history) if key in e]
    return [s for s, _ in points], [v for _, v in points]


def _curves_figure(log_history, panels: Sequence[tuple[str, Sequence[str]]], title: str):
    """One panel per ``(y label, keys)`` that has data; None when no key is logged at all."""
    panels = [(label, [k for k in keys if any(k in e for e in log_history)]) for label, keys in panels]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    figure = _figure(6.0, 3.0 * len(panels))
    for i, (label, keys) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, i + 1)
        for key in keys:
            axes.plot(*log_series(log_history, key), marker=".", label=key)
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.legend()
    figure.suptitle(title)
    return figure


def reward_kl_figure(log_history: Sequence[Mapping[str, Any]]):
    """Reward (feedback's ``reward``; DPO's ``rewards/chosen|rejected|margins``) and KL (feedback's ``kl``, NPO's
    ``forget/logratio``) over training steps; None when the run logged neither."""
    return _curves_figure(
        log_history,
        [("reward", REWARD_KEYS), ("KL / log-ratio to the reference", KL_KEYS)],
        "Reward and KL over training",
    )


def forget_retain_figure(log_history: Sequence[Mapping[str, Any]]):
    """NPO's ``forget/loss``, ``retain/loss`` and ``forget/nll`` over training steps; None without them."""
    return _curves_figure(log_history, [("loss", FORGET_RETAIN_KEYS)], "Forget / retain over training")


def quantile_counts(log_history: Sequence[Mapping[str, Any]]) -> tuple[str, list[int], list[list[float]]]:
    """``(kind, steps, counts)``: the pool's rows per quantile (or category) bin at each logged step (0 = best)."""
    kind, steps, counts = "quantile", [], []
    for i, entry in enumerate(log_history):
        bins = {int(m.group(2)): float(v) for k, v in entry.items() if (m := _QUANTILE.match(k))}
        if bins:
            kind = next(m.group(1) for k in entry if (m := _QUANTILE.match(k)))
            steps.append(int(entry.get("step", i)))
            counts.append([bins.get(b, 0.0) for b in range(max(bins) + 1)])
    return kind, steps, counts


def quantile_figure(log_history: Sequence[Mapping[str, Any]]):
    """Grouped bars: pool rows per quantile bin (0 = best), one group per logged step (Quark/ALT rounds); None when
    no ``pool/quantile_<i>`` / ``pool/category_<i>`` was logged."""
    kind, steps, counts = quantile_counts(log_history)
    if not counts:
        return None
    num_bins = max(len(c) for c in counts)
    figure = _figure(max(5.0, 0.5 * num_bins * len(counts) + 2.0), 3.5)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(counts)
    for j, (step, row) in enumerate(zip(steps, counts)):
        axes.bar([b + j * width for b in range(len(row))], row, width=width, label=f"step {step}")
    axes.set_xticks([b + 0.4 - width / 2 for b in range(num_bins)], [f"{kind} {b}" for b in range(num_bins)])
    axes.set_xlabel(f"{kind} bin (0 = best)")
    axes.set_ylabel("rows in the pool")
    axes.legend()
    axes.set_title(f"Pool per {kind} bin at each logged round")
    return figure


TRAINING_PLOTS = {
    REWARD_PLOT_FILE: reward_kl_figure,
    FORGET_RETAIN_PLOT_FILE: forget_retain_figure,
    QUANTILE_PLOT_FILE: quantile_figure,
}


def training_figures(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{file name: Figure}`` of every training plot the log history has data for."""
    figures = {name: build(log_history) for name, build in TRAINING_PLOTS.items()}
    return {name: figure for name, figure in figures.items() if figure is not None}


def write_training_plots(log_history: Sequence[Mapping[str, Any]], folder: PathLike) -> list[Path]:
    """Every :func:`training_figures` PNG written into ``folder``; the paths written."""
    return [save_figure(figure, Path(folder) / name) for name, figure in training_figures(log_history).items()]
