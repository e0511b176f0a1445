"""Neuron masks: which parameter entries (ALLO's "neurons") or output rows a stage may train.

One home for masks, used by every trainer, callback and the CLI (``docs/masked_dpo.md``):

* ``NeuronMask.masks`` maps a parameter name of the plain model (``model.layers.0.mlp.up_proj.weight``) to a bool
  tensor. A full-shape mask is *element* granularity (ALLO: every parameter entry is a neuron); a 1-D mask of length
  ``shape[0]`` on a weight with two or more dims is *row* granularity (a neuron is one output row).
* ``NeuronMask.from_scores`` is the one path from importance scores to a mask: exact count ``round(ratio * n)``,
  deterministic ties (a stable sort over names in sorted order), top / bottom / random, one global ranking (ALLO)
  or one per tensor, and ALLO's band (``exclude_top`` skips the very top before keeping ``ratio``).
* ``save`` / ``load`` write a bit-packed safetensors file plus a JSON header: 1 bit per entry, never a float.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_align.architectures import (
    ROW_TARGET,
    in_order,
    layer_index,
    neuron_axes,
    neuron_axis,
    plain_name,
    row_length,
)
from hf_align.config_checks import BELOW_ONE, FRACTION, CheckedConfig, check_choice, check_option, option
from hf_align.errors import UserError
from hf_align.io import (
    PARAMETER_ORDER,
    PathLike,
    atomic_files,
    check_same_save,
    load_tensors,
    new_save_id,
    read_json,
    save_tensors,
    saved_order,
    write_json,
)
from hf_align.progress import progress_bar
from hf_align.scores import GRANULARITIES, ScoreOptions


__all__ = ["MASK_FILE", "MASK_META_FILE", "MaskSelection", "NeuronMask", "parameter_shape", "default_target"]

MASK_FILE = "neuron_mask.safetensors"
MASK_META_FILE = "neuron_mask.json"
FORMAT = "hf-align-neuron-mask"
SCOPES = ("global", "tensor")
SELECTS = ("top", "bottom", "random")
BUDGETS = ("neurons", "params")
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def parameter_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The logical shape of a parameter: a bitsandbytes 4-bit weight is stored packed (its quant state knows), a
    DeepSpeed ZeRO-3 parameter is partitioned (each rank holds a slice, often ``(0,)``; ``ds_shape`` is the full
    shape). A DTensor (FSDP2) already reports its global shape."""
    ds_shape = getattr(param, "ds_shape", None)
    if ds_shape is not None:
        return tuple(ds_shape)
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return tuple(quant_state.shape)
    return tuple(param.shape)


def default_target(granularity: str) -> str | None:
    """ALLO masks every parameter (element); row masks cover decoder-layer matrices."""
    return None if granularity == "element" else ROW_TARGET


def _matches(name: str, target: str | Iterable[str] | None) -> bool:
    from hf_align.scores import matches_target

    return matches_target(name, target)


def _plain_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(plain name, parameter)`` for a plain or PEFT-wrapped model; adapter weights and neuron deltas are skipped.

    A weight with attached deltas (``q_proj.parametrizations.weight.original``) keeps its plain name.
    """
    for name, param in model.named_parameters():
        if ".parametrizations." in name:
            prefix, rest = name.split(".parametrizations.", 1)
            attr, tail = rest.split(".", 1)
            if tail != "original":
                continue
            name = f"{prefix}.{attr}"
        elif name.endswith(".neuron_delta.delta"):
            continue
        plain = plain_name(name)
        if plain is not None:
            yield plain, param


def neuron_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per row-neuron of every plain parameter of ``model``: a row's length (``numel`` over the output
    features, GPT-2's ``Conv1D`` on axis 1), 1 for a 1-D parameter. What a row mask trains, counted in weights."""
    axes = neuron_axes(model)
    sizes = {}
    for name, param in _plain_parameters(model):
        shape = parameter_shape(param)
        sizes[name] = row_length(shape, neuron_axis(axes, name))
    return sizes


@dataclass
class MaskSelection(CheckedConfig):
    """How a mask is chosen from scores -- the options of :meth:`NeuronMask.from_scores`, declared once.

    The trainer configs (``neuron_mask_*``), ``MaskAccumulationCallback`` (``select_*``), ``hf-align warmup-dpo`` and
    ``hf-align select-mask`` read these fields (:func:`hf_align.config_checks.prefixed_fields`), so a default, a
    range or a help text is changed here and nowhere else. Checked when built, like every config.
    """

    ratio: float | None = option(
        None,
        help="Fraction of the scored neurons (rows or entries) to select, in (0, 1] (unset: no selection).",
        range=FRACTION,
    )
    scope: str = option(
        "global",
        help="Selection threshold over all parameters ('global', as ALLO) or one per tensor ('tensor').",
        choices=SCOPES,
    )
    select: str = option(
        "top", help="Which scores to keep: 'top' (ALLO), or 'bottom' / 'random' for ablations.", choices=SELECTS
    )
    exclude_top: float = option(
        0.0,
        help="Fraction of the very top scores to skip before keeping `ratio` (ALLO's band l..l+r); 0 keeps them.",
        range=BELOW_ONE,
    )
    seed: int = option(0, help="Seed of select='random'.")
    budget: str = option(
        "neurons",
        help="What `ratio` counts: 'neurons' (rows or entries, each once) or 'params' (a row counted by its length, "
        "as ALLO's ratios count parameter entries). Differs only for global row masks over rows of different "
        "lengths (ratio 0.1 of SmolLM2's rows by neurons trained 0.2 of its weights).",
        choices=BUDGETS,
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_band(self.ratio, self.exclude_top)

    @staticmethod
    def check_band(ratio: float | None, exclude_top: float, prefix: str = "") -> None:
        """ALLO's band must fit: ``exclude_top + ratio <= 1`` (``prefix``: how the caller names the two fields)."""
        if ratio is not None and ratio + exclude_top > 1.0 + 1e-12:
            raise UserError(f"{prefix}exclude_top + {prefix}ratio must be at most 1, got {exclude_top} + {ratio}.")


def _selection(selection: MaskSelection | float | None, **given: Any) -> MaskSelection:
    """A :class:`MaskSelection` from ``from_scores``' arguments (checked when built); the ratio is required."""
    given = {name: value for name, value in given.items() if value is not None}
    if isinstance(selection, MaskSelection):
        selection = dataclasses.replace(selection, **given)
    else:
        if selection is not None and "ratio" in given:
            raise TypeError("from_scores got the ratio twice (positionally and as ratio=).")
        selection = MaskSelection(**{"ratio": selection, **given})
    if selection.ratio is None:
        raise UserError("MaskSelection.ratio is required to select a mask (a number in (0, 1]).")
    return selection


def _order_keys(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """int32 keys whose order is the float order (descending: larger first), so ranks can be found by counting."""
    bits = (values.reshape(-1).float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0: one tie, as in a sort
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return keys if descending else ~keys


def _first_n(keys: dict[str, torch.Tensor], n: int, sizes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The largest keys over all tensors until their sizes add up to ``n``, ties broken by position (names in order,
    then flat index). ``sizes``: what one key of a tensor counts (a row's length under a parameter budget; 1 else).

    The same set a stable descending sort of the concatenation would put first, found by a bisection over the key
    value (32 counting passes) instead of a sort: no concatenated copy and no int64 index per entry, so selecting
    among billions of entries needs about 4 bytes per entry (the keys) rather than 16+. Under sizes, the last key
    taken may pass ``n`` by less than its size: the budget is reached, never missed.
    """
    size = {name: (sizes or {}).get(name, 1) for name in keys}
    total = sum(k.numel() * size[name] for name, k in keys.items())
    if n <= 0:
        return {name: torch.zeros(k.numel(), dtype=torch.bool) for name, k in keys.items()}
    if n >= total:
        return {name: torch.ones(k.numel(), dtype=torch.bool) for name, k in keys.items()}
    low, high = -(2**31), 2**31 - 1  # the largest t with count(key >= t) >= n is the n-th largest key
    while low < high:
        middle = (low + high + 1) // 2
        if sum(int((k >= middle).sum()) * size[name] for name, k in keys.items()) >= n:
            low = middle
        else:
            high = middle - 1
    chosen = {name: k > low for name, k in keys.items()}
    need = n - sum(int(c.sum()) * size[name] for name, c in chosen.items())
    for name, k in keys.items():  # the ties at the threshold, first positions first
        if need <= 0:
            break
        ties = (k == low).nonzero().view(-1)[: math.ceil(need / size[name])]
        chosen[name][ties] = True
        need -= ties.numel() * size[name]
    return chosen


def _band(
    keys: dict[str, torch.Tensor], ratio: float, exclude_top: float, sizes: Mapping[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Ranks ``[round(l·n), round(l·n) + round(r·n))`` of the keys (ALLO's band; l = 0 is a plain top-r), ``n``
    counted in ``sizes`` (parameters) when given, in keys otherwise."""
    total = sum(k.numel() * (sizes or {}).get(name, 1) for name, k in keys.items())
    skip, keep = round(exclude_top * total), round(ratio * total)
    upto = _first_n(keys, skip + keep, sizes)
    if skip == 0:
        return upto
    above = _first_n(keys, skip, sizes)  # the top-n sets are nested: same total order
    return {name: upto[name] & ~above[name] for name in keys}


def _header_shapes(header: dict, meta_path: Path) -> dict[str, tuple[int, ...]]:
    """The ``shapes`` of a mask header, each a list of non-negative integers (errors name the file and the entry)."""
    shapes = {}
    for name, shape in header["shapes"].items():
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(
                f"{str(meta_path)!r}: shapes[{name!r}] must be a list of non-negative integers, got {shape!r}."
            )
        shapes[name] = tuple(shape)
    return shapes


def _all_equal(scores: Iterable[torch.Tensor]) -> bool:
    """Whether every entry of every score tensor has one and the same value."""
    first = None
    for score in scores:
        if score.numel() == 0:
            continue
        first = score.reshape(-1)[0] if first is None else first
        if not bool((score == first).all()):
            return False
    return first is not None


def _pack(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    bits = (packed.to(torch.uint8).view(-1, 1) & _BITS).ne(0).reshape(-1)
    return bits[: math.prod(shape)].reshape(shape)


def _budget_sizes(
    scores: Mapping[str, torch.Tensor], budget: str, neuron_sizes: Mapping[str, int] | None
) -> dict[str, int] | None:
    """What one score counts under ``budget``: ``None`` for 'neurons'; for 'params', a row score its row's length
    (``neuron_sizes``), an element score 1. A row score without its length is refused by name."""
    if budget != "params":
        return None
    sizes = {}
    for name, score in scores.items():
        if score.dim() != 1:
            sizes[name] = 1
            continue
        size = (neuron_sizes or {}).get(name)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UserError(
                f"budget='params' counts a row by its length, but the length of {name!r}'s rows is unknown "
                f"(got {size!r}): pass neuron_sizes=hf_align.masks.neuron_sizes(model), or use budget='neurons'."
            )
        sizes[name] = size
    return sizes


@dataclass
class NeuronMask:
    """Selected entries (element masks) or output rows (row masks) per parameter name of the plain model.

    ``info`` keeps how the mask was made (ratio asked for, scope, select, exclude_top, seed, base model); it is
    written to the JSON header by :meth:`save`.
    """

    masks: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.masks, Mapping) or not self.masks:
            raise ValueError("A NeuronMask needs at least one parameter mask (got an empty mapping).")
        for name, mask in self.masks.items():
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"Mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}.")
        self.masks = {name: mask.detach().to("cpu").bool() for name, mask in self.masks.items()}
        if not any(bool(mask.any()) for mask in self.masks.values()):
            warnings.warn("This NeuronMask selects no neuron: training with it changes nothing.", stacklevel=3)

    # ------------------------------------------------------------------------------------------- counts
    @property
    def num_selected(self) -> int:
        return sum(int(mask.sum()) for mask in self.masks.values())

    @property
    def num_total(self) -> int:
        """Neurons the mask ranges over: entries of element masks, rows of row masks."""
        return sum(mask.numel() for mask in self.masks.values())

    @property
    def ratio(self) -> float:
        return self.num_selected / max(self.num_total, 1)

    @property
    def granularity(self) -> str:
        """``"row"`` when every mask is 1-D (rows; also true of 1-D parameters), else ``"element"``."""
        return self.info.get("granularity") or ("row" if all(m.dim() == 1 for m in self.masks.values()) else "element")

    @property
    def neuron_sizes(self) -> dict[str, int] | None:
        """Parameters per neuron of each masked tensor (1 for an element mask), or ``None`` while a row mask's row
        lengths are unknown (a mask made from scores alone; :meth:`validate` against a model fills them in)."""
        known = self.info.get("neuron_sizes") or {}
        sizes = {name: (known.get(name) if mask.dim() == 1 else 1) for name, mask in self.masks.items()}
        return None if any(size is None for size in sizes.values()) else sizes

    @property
    def num_params_selected(self) -> int | None:
        """Weights the mask trains (a row counted by its length); ``None`` when row lengths are unknown."""
        sizes = self.neuron_sizes
        return None if sizes is None else sum(int(m.sum()) * sizes[n] for n, m in self.masks.items())

    @property
    def num_params_total(self) -> int | None:
        sizes = self.neuron_sizes
        return None if sizes is None else sum(m.numel() * sizes[n] for n, m in self.masks.items())

    @property
    def param_ratio(self) -> float | None:
        """The fraction of the masked tensors' weights the mask trains (what ALLO's "10 %" means)."""
        total = self.num_params_total
        return None if total is None else self.num_params_selected / max(total, 1)

    def __repr__(self) -> str:
        params = ""
        if self.param_ratio is not None and self.granularity == "row":
            params = f", params={self.num_params_selected}/{self.num_params_total} ({self.param_ratio:.4%})"
        return (
            f"NeuronMask(granularity={self.granularity!r}, tensors={len(self.masks)}, "
            f"selected={self.num_selected}/{self.num_total} ({self.ratio:.4%}){params})"
        )

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, torch.Tensor],
        selection: MaskSelection | float | None = None,
        scope: str | None = None,
        select: str | None = None,
        exclude_top: float | None = None,
        seed: int | None = None,
        target: str | Iterable[str] | None = None,
        *,
        ratio: float | None = None,
        budget: str | None = None,
        neuron_sizes: Mapping[str, int] | None = None,
        progress: bool = False,
    ) -> NeuronMask:
        """Keep ``round(ratio * n)`` neurons ranked by score, skipping the top ``round(exclude_top * n)`` first.

        ``selection``: a :class:`MaskSelection`, or the ratio itself (the older spelling); the keyword arguments
        override its fields. ``scope="global"`` ranks all neurons together (ALLO's one threshold); ``"tensor"`` ranks
        each tensor alone (``n`` is then per tensor). ``select="bottom"`` keeps the lowest, ``"random"`` a seeded
        random set (the paper's ablations). Scores are keyed like the masks: full-shape ⇒ element, 1-D ⇒ row.
        ``budget="params"`` counts ``n`` in parameters, a row by its length from ``neuron_sizes`` (:func:`neuron_sizes`
        of the model; needed for row scores), so ``ratio`` is the fraction of weights trained, as in ALLO.
        """
        selection = _selection(
            selection, ratio=ratio, scope=scope, select=select, exclude_top=exclude_top, seed=seed, budget=budget
        )
        ratio, scope, select = selection.ratio, selection.scope, selection.select
        exclude_top, seed = selection.exclude_top, selection.seed
        names = sorted(name for name in scores if _matches(name, target))
        if not names:
            raise UserError(f"No scores left to select from (target={target!r} matched none of {len(scores)}).")
        values = {}
        generator = torch.Generator().manual_seed(seed)
        for name in names:
            score = scores[name]
            if not isinstance(score, torch.Tensor) or not score.is_floating_point():
                raise TypeError(f"Score for {name!r} must be a floating-point tensor.")
            if torch.isnan(score).any():
                raise ValueError(f"Score for {name!r} contains NaN values; scores must be finite numbers.")
            if select == "random":
                score = torch.rand(score.shape, generator=generator)
            elif not torch.isfinite(score).all():
                raise ValueError(f"Score for {name!r} contains inf values; scores must be finite numbers.")
            values[name] = score.detach().to("cpu", torch.float32)
        if select != "random" and _all_equal(values.values()):
            warnings.warn(
                "Every score is equal (two identical checkpoints?): the selection is arbitrary, ties go by position.",
                stacklevel=2,
            )
        descending = select != "bottom"
        sizes = _budget_sizes(values, selection.budget, neuron_sizes)
        shapes = {name: v.shape for name, v in values.items()}
        keys, masks = {}, {}
        for name in progress_bar(names, desc="selecting", unit="tensor", enabled=progress):
            keys[name] = _order_keys(values.pop(name), descending)  # keys replace the float copies one at a time
            if scope == "tensor":  # one tensor's rows are all one length: a parameter budget selects the same rows
                masks[name] = _band({name: keys.pop(name)}, ratio, exclude_top)[name].view(shapes[name])
        if scope != "tensor":
            chosen = _band(keys, ratio, exclude_top, sizes)
            masks = {name: chosen[name].view(shapes[name]) for name in names}
        if not any(bool(mask.any()) for mask in masks.values()):
            total = sum(mask.numel() for mask in masks.values())
            raise UserError(
                f"ratio={ratio} selects no neuron (round(ratio * n) is 0 for n={total} "
                f"{'per tensor' if scope == 'tensor' else 'in all'}); raise ratio."
            )
        info = {"ratio_requested": ratio, "scope": scope, "select": select, "exclude_top": exclude_top, "seed": seed}
        info["budget"] = selection.budget
        masks = in_order(masks, list(scores))  # ranked in sorted order (ties), kept in the caller's order
        known = {name: (neuron_sizes or {}).get(name) for name, mask in masks.items() if mask.dim() == 1}
        if known and all(isinstance(size, int) for size in known.values()):  # the mask can say what it trains
            info["neuron_sizes"] = known
        return cls(masks, info)

    @classmethod
    def from_weight_diff(
        cls,
        init: PathLike,
        trained: PathLike,
        ratio: MaskSelection | float,
        granularity: str = "element",
        target: str | Iterable[str] | None = None,
        **selection: Any,
    ) -> NeuronMask:
        """ALLO's ``gen_neuron_mask.py``: score ``|θ_trained − θ_init|``, streamed one tensor at a time.

        Element granularity scores every floating-point tensor by default (ALLO); row granularity the decoder-layer
        weights with two or more dims (the sum of ``|Δ|`` over each output row). ``target`` narrows either.
        """
        from hf_align.scores import CheckpointReader, weight_diff_scores

        check_option(ScoreOptions, "granularity", granularity, label="granularity")
        reader = CheckpointReader(init)
        if target is None:
            target = default_target(granularity)
        if granularity == "row":  # a row is an output row of a matrix: 1-D tensors (norms, biases) have none
            names = [n for n in reader.keys() if _matches(n, target) and len(reader.shape(n)) >= 2]
            if not names:
                raise ValueError(f"No tensor with two or more dims in {str(init)!r} matches target={target!r}.")
            target = [re.escape(n) for n in names]
            target = "^(" + "|".join(target) + ")$"
        scores = weight_diff_scores(reader, trained, granularity=granularity, target=target)
        mask = cls.from_scores(scores, ratio, **selection)
        from hf_align.hub import hub_id

        base = hub_id(str(init))  # the header is uploaded with the mask: a Hub id, never the writer's path
        mask.info.update(granularity=granularity, **({"base_model": base} if base else {}))
        return mask

    @classmethod
    def _like_model(
        cls, model: torch.nn.Module, granularity: str, target: str | Iterable[str] | None
    ) -> dict[str, tuple[int, ...]]:
        check_option(ScoreOptions, "granularity", granularity, label="granularity")
        target = default_target(granularity) if target is None else target
        shapes = {}
        axes = neuron_axes(model)
        for name, param in _plain_parameters(model):
            shape = parameter_shape(param)
            if not param.is_floating_point() and getattr(param, "quant_state", None) is None:
                continue
            if not _matches(name, target):
                continue
            if granularity == "row":
                if len(shape) < 2:
                    continue
                shape = (shape[neuron_axis(axes, name)],)
            shapes[name] = shape
        if not shapes:
            raise ValueError(f"No parameter of the model matches target={target!r} for {granularity} masks.")
        return shapes

    @classmethod
    def full(
        cls, model: torch.nn.Module, granularity: str = "element", target: str | Iterable[str] | None = None
    ) -> NeuronMask:
        """Every neuron of every targeted parameter (ratio 1.0: trains like no mask, through the delta mechanism)."""
        shapes = cls._like_model(model, granularity, target)
        return cls({n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}, {"granularity": granularity})

    @classmethod
    def random(
        cls,
        model: torch.nn.Module,
        ratio: float,
        granularity: str = "element",
        seed: int = 0,
        scope: str = "global",
        target: str | Iterable[str] | None = None,
        budget: str = "neurons",
    ) -> NeuronMask:
        """A seeded random mask of exactly ``round(ratio * n)`` neurons (the paper's random-mask ablation);
        ``budget="params"``: of ``ratio`` of the weights (rows counted by their length)."""
        shapes = cls._like_model(model, granularity, target)
        scores = {name: torch.zeros(shape) for name, shape in shapes.items()}
        mask = cls.from_scores(scores, ratio, scope=scope, select="random", seed=seed, budget=budget,
                               neuron_sizes=neuron_sizes(model))  # fmt: skip
        mask.info["granularity"] = granularity
        mask.validate(model)  # records the row lengths: the mask reports the weights it trains
        return mask

    # ---------------------------------------------------------------------------------------- checks
    def validate(self, model: torch.nn.Module) -> None:
        """Raise a clear error naming the parameter when the mask does not fit ``model`` (names or shapes)."""
        params = dict(_plain_parameters(model))
        axes = neuron_axes(model)
        missing = [name for name in self.masks if name not in params]
        if missing:
            example = next(iter(params), "<none>")
            raise ValueError(
                f"Neuron mask names {len(missing)} parameter(s) the model does not have, e.g. {missing[0]!r} "
                f"(the model's parameters look like {example!r}). Was the mask made for another model?"
            )
        for name, mask in self.masks.items():
            shape = parameter_shape(params[name])
            if tuple(mask.shape) == shape:
                continue
            features = shape[neuron_axis(axes, name)] if len(shape) >= 2 else None
            if mask.dim() == 1 and mask.shape[0] == features:
                continue
            rows = f" or ({features},) (row: one per output feature{', axis 1 of a Conv1D' if name in axes else ''})"
            raise ValueError(
                f"Neuron mask for {name!r} has shape {tuple(mask.shape)}, but the parameter has shape {shape}: "
                f"expected {shape} (element){rows if features else ''}. Was the mask made for another model?"
            )
        sizes = neuron_sizes(model)  # the model knows its row lengths: the mask can now say what it trains
        rows_of = {name: sizes[name] for name, mask in self.masks.items() if mask.dim() == 1}
        if rows_of:
            self.info["neuron_sizes"] = rows_of

    def is_row(self, name: str, param_shape: tuple[int, ...]) -> bool:
        """Whether the mask for ``name`` selects output features ("rows") of a parameter of ``param_shape``."""
        return self.masks[name].dim() == 1 and len(param_shape) >= 2

    # -------------------------------------------------------------------------------------- analysis
    def _combine(self, other: NeuronMask, op) -> NeuronMask:
        if not isinstance(other, NeuronMask):
            raise TypeError(f"Expected a NeuronMask, got {type(other).__name__}.")
        combined = {}
        for name in sorted(set(self.masks) | set(other.masks)):
            a, b = self.masks.get(name), other.masks.get(name)
            if a is not None and b is not None and a.shape != b.shape:
                raise ValueError(f"Masks for {name!r} differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}.")
            a = a if a is not None else torch.zeros_like(b)
            b = b if b is not None else torch.zeros_like(a)
            combined[name] = op(a, b)
        return NeuronMask(combined, {"granularity": self.granularity})

    def union(self, other: NeuronMask) -> NeuronMask:
        return self._combine(other, torch.logical_or)

    def intersection(self, other: NeuronMask) -> NeuronMask:
        return self._combine(other, torch.logical_and)

    def per_tensor_fraction(self) -> dict[str, float]:
        return {name: float(mask.float().mean()) for name, mask in self.masks.items()}

    def per_layer_counts(self) -> dict[tuple[int | None, str], tuple[int, int]]:
        """``(selected, total)`` neurons per ``(decoder layer index or None, module type)``, in the masks' order."""
        counts: dict[tuple[int | None, str], tuple[int, int]] = {}
        for name, mask in self.masks.items():
            parts = name.split(".")
            key = (layer_index(name), parts[-2] if len(parts) > 1 else parts[-1])
            selected, total = counts.get(key, (0, 0))
            counts[key] = (selected + int(mask.sum()), total + mask.numel())
        return counts

    def per_layer_fraction(self) -> dict[tuple[int | None, str], float]:
        """Selected fraction per ``(decoder layer index or None, module type)``, e.g. ``(3, "q_proj")``."""
        return {key: selected / total for key, (selected, total) in self.per_layer_counts().items()}

    def summary(self) -> str:
        lines = [repr(self)]
        width = max(len(n) for n in self.masks)
        for name, mask in self.masks.items():
            lines.append(
                f"  {name:<{width}}  {int(mask.sum()):>10}/{mask.numel():<10} {float(mask.float().mean()):.4f}"
            )
        return "\n".join(lines)

    # -------------------------------------------------------------------------------------------- I/O
    def save(self, directory: PathLike) -> Path:
        """Write ``neuron_mask.safetensors`` (1 bit per neuron) and ``neuron_mask.json`` into ``directory``."""
        directory = Path(directory)
        header = {
            "format": FORMAT,
            "version": 1,
            "granularity": self.granularity,
            "ratio": self.ratio,
            "num_selected": self.num_selected,
            "num_total": self.num_total,
            "shapes": {name: list(mask.shape) for name, mask in self.masks.items()},
            **{k: v for k, v in self.info.items() if k != "granularity"},
            PARAMETER_ORDER: list(self.masks),  # JSON and safetensors sort their keys: the model's order, kept
        }
        header["save_id"] = save_id = new_save_id()
        packed = {name: _pack(mask) for name, mask in self.masks.items()}
        with atomic_files(directory / MASK_FILE, directory / MASK_META_FILE) as (tensors_tmp, header_tmp):
            save_tensors(tensors_tmp, packed, metadata={"save_id": save_id})
            write_json(header_tmp, header)
        return directory

    @classmethod
    def load(cls, directory: PathLike, revision: str | None = None) -> NeuronMask:
        """Read a mask written by :meth:`save` from a folder or a Hub repo id (``revision``: a branch, tag or
        commit; see :func:`hf_align.hub.resolve_local`); errors name the file and what is wrong with it."""
        from hf_align.hub_download import resolve_local

        directory = resolve_local(directory, revision, [MASK_FILE, MASK_META_FILE], what="neuron mask")
        if not directory.is_dir():
            raise FileNotFoundError(f"Neuron mask directory {str(directory)!r} does not exist.")
        meta_path = directory / MASK_META_FILE
        header = read_json(meta_path)
        if (
            not isinstance(header, dict)
            or header.get("format") != FORMAT
            or not isinstance(header.get("shapes"), dict)
        ):
            raise UserError(f"{str(meta_path)!r} is not a neuron-mask header (expected format {FORMAT!r} and shapes).")
        shapes = _header_shapes(header, meta_path)
        packed = load_tensors(directory / MASK_FILE)
        check_same_save(directory / MASK_FILE, meta_path, header.get("save_id"))
        if set(packed) != set(shapes):
            raise UserError(
                f"{str(directory / MASK_FILE)!r} and {str(meta_path)!r} list different parameters "
                f"({sorted(set(packed) ^ set(shapes))[:3]}…)."
            )
        masks = {}
        for name, shape in in_order(shapes, saved_order(header, meta_path)).items():
            if packed[name].dtype != torch.uint8 or packed[name].numel() != math.ceil(math.prod(shape) / 8):
                raise UserError(
                    f"Mask {name!r} in {str(directory / MASK_FILE)!r} does not match its shape {shape} "
                    f"(expected {math.ceil(math.prod(shape) / 8)} packed uint8 bytes, got {packed[name].numel()} "
                    f"{packed[name].dtype})."
                )
            masks[name] = _unpack(packed[name], shape)
        expected = header.get("num_selected")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
            raise UserError(f"{str(meta_path)!r}: num_selected must be an integer, got {expected!r}.")
        granularity = header.get("granularity")
        check_choice(f"{str(meta_path)!r}: granularity", granularity, GRANULARITIES)
        if granularity == "row" and any(m.dim() != 1 for m in masks.values()):
            name = next(n for n, m in masks.items() if m.dim() != 1)
            raise UserError(
                f"{str(meta_path)!r} says granularity 'row' but mask {name!r} has shape {tuple(masks[name].shape)} "
                "(a row mask is 1-D: one entry per output feature)."
            )
        if expected is not None and expected != sum(int(m.sum()) for m in masks.values()):
            raise UserError(
                f"{str(directory / MASK_FILE)!r} selects {sum(int(m.sum()) for m in masks.values())} neurons but "
                f"{str(meta_path)!r} says {expected}: the files are corrupt or from different masks."
            )
        info = {
            k: v
            for k, v in header.items()
            if k not in ("format", "version", "shapes", "ratio", "num_total", "save_id", PARAMETER_ORDER)
        }
        info.pop("num_selected", None)
        sizes = info.get("neuron_sizes")
        if sizes is not None and not (
            isinstance(sizes, dict)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes.values())
            and set(sizes) <= set(masks)
        ):
            raise UserError(f"{str(meta_path)!r}: neuron_sizes must map masked parameters to row lengths ≥ 1.")
        return cls(masks, info)
