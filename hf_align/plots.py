"""What a researcher looks at first after selecting neurons (ALLO's figure 1): where the mask lands.

* :func:`plot_selection_heatmap` — selected fraction per decoder layer × module type.
* :func:`plot_score_distribution` — histogram of the neuron scores (log scale), with the selection threshold.

PNG files via matplotlib (``pip install 'hf-align[plots]'``); written atomically, no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hf_align.io import PathLike, atomic_file


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


def _save(figure, path: PathLike) -> Path:
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", bbox_inches="tight")
    return path


def _fractions(selection: Any) -> dict[tuple[Any, str], float]:
    if hasattr(selection, "per_layer_fraction"):
        selection = selection.per_layer_fraction()
    if not isinstance(selection, Mapping) or not selection:
        raise ValueError(
            "plot_selection_heatmap expects a NeuronMask or a non-empty {(layer_idx, module_type): fraction} mapping."
        )
    return dict(selection)


def plot_selection_heatmap(selection: Any, path: PathLike, title: str | None = None) -> Path:
    """Heatmap of the selected fraction: rows = decoder layers, columns = module types (e.g. ``q_proj``).

    ``selection`` is a ``NeuronMask`` (its ``per_layer_fraction()`` is used) or that mapping itself; entries
    with layer ``None`` (embeddings, final norm, ``lm_head``) go into an ``other`` row at the bottom.
    """
    fractions = _fractions(selection)
    layers = sorted({layer for layer, _ in fractions if layer is not None})
    if any(layer is None for layer, _ in fractions):
        layers.append(None)
    modules = sorted({module for _, module in fractions})
    grid = [[fractions.get((layer, module), math.nan) for module in modules] for layer in layers]
    figure = _figure(max(4.0, 0.6 * len(modules) + 2.5), max(3.0, 0.3 * len(layers) + 1.5))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    axes.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), ["other" if layer is None else str(layer) for layer in layers])
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title(title or "Selected fraction per layer × module type")
    figure.colorbar(image, ax=axes, label="selected fraction")
    return _save(figure, path)


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
    return _save(figure, path)
