"""Merge plans: which averaging ratio α each tensor gets (θ = α·θ_base + (1−α)·θ_aligned).

A plan is built once from the tensor names of the checkpoint and then used by every entry point
(function, CLI, callback), printed for the user and saved next to the merged model as ``merge_plan.json``.

Partwise rules (AMA's ``pivots``/``alphas``):

- decoder layer ``N`` (any name with ``layers.N.``, e.g. ``model.layers.3.mlp.up_proj.weight``) gets the α of
  its part; pivots are inclusive: ``10#20`` → layers 0–10, 11–20, 21–last; layer norms inside a layer
  follow their layer;
- input embeddings (``embed_tokens``) get ``embed_alpha`` (default: the first part's α);
- ``lm_head`` and the final norm (``model.norm``) get ``head_alpha`` (default: the last part's α): the final
  norm feeds the head directly, so they are averaged together;
- with tied embeddings the head *is* the token embedding: that one tensor (and a stored ``lm_head.weight``, its
  copy) is merged once, with the α of the block the user named, ``tied_block="embed"`` (``embed_alpha``) or
  ``"head"`` (``head_alpha``); by default the one of ``embed_alpha``/``head_alpha`` that was given, else ``embed``.
  The plan's group and description say which, so the printed table and the card do too;
- any other tensor gets ``other_alpha``; without it such tensors are an error (naming them), so nothing is
  averaged by a rule nobody chose.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hf_align.architectures import layer_index
from hf_align.config_checks import check_choice
from hf_align.errors import UserError
from hf_align.io import PathLike, read_json, require_keys, write_json


PLAN_FILE = "merge_plan.json"
logger = logging.getLogger(__name__)
_EMBED = ("embed_tokens.", "wte.", "wpe.", "embed_in.")  # GPT-2: token and position embeddings
_HEAD = ("lm_head.", "embed_out.")


def tensor_role(name: str) -> str:
    """One of ``layer``, ``embed``, ``head``, ``final_norm``, ``other`` (see the module docstring)."""
    if layer_index(name) is not None:
        return "layer"
    if any(part in name for part in _EMBED):
        return "embed"
    if name.startswith(_HEAD) or any(f".{head}" in name for head in _HEAD):
        return "head"
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if "norm" in module or module == "ln_f":
        return "final_norm"
    return "other"


TIED_BLOCKS = ("embed", "head")
TIED_GROUPS = {"embed": "embeddings (tied with lm_head)", "head": "lm_head (tied with embeddings) + final norm"}
_TOKEN_EMBED = ("embed_tokens.", "wte.", "embed_in.", "word_embeddings.")


def is_token_embedding(name: str) -> bool:
    """The input token embedding, the tensor a tied lm_head shares (not GPT-2's position embedding ``wpe``)."""
    return any(part in name for part in _TOKEN_EMBED) and layer_index(name) is None


def _tied_choice(
    tied: bool, tied_block: str | None, embed_alpha: float | None, head_alpha: float | None
) -> str | None:
    """Which block's α the tied embedding/head tensor takes: the one named, else the one whose α was given."""
    check_choice("tied_block", tied_block, TIED_BLOCKS)
    if not tied:
        return None
    if tied_block is not None:
        return tied_block
    if head_alpha is not None and embed_alpha is None:
        return "head"
    if head_alpha is not None and float(head_alpha) != float(embed_alpha):
        logger.warning(
            f"tied embeddings: the one tensor is merged with embed_alpha={embed_alpha} (head_alpha={head_alpha} "
            "applies to the final norm only); pass tied_block='head' to merge it with head_alpha."
        )
    return "embed"


def check_alpha(value: float, what: str) -> float:
    """α must be a number in [0, 1]: raise naming ``what`` otherwise."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in [0, 1], got {value!r}.") from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{what} must be in [0, 1] (α weighs the base model), got {value}.")
    return value


def parse_pivots(pivots: str | Sequence[int] | None) -> list[int]:
    """``"10#20"``, ``"10,20"``, ``"[10, 20]"`` or ``[10, 20]`` → ``[10, 20]`` (strictly increasing, ≥ 0)."""
    if pivots is None or pivots == "":
        return []
    if isinstance(pivots, str):
        items = [p for p in re.split(r"[#,|\s]+", pivots.strip().strip("[]")) if p]
    else:
        items = list(pivots)
    try:
        values = [int(p) for p in items]
    except (TypeError, ValueError):
        raise UserError(f"pivots must be layer indices like '10#20' or [10, 20], got {pivots!r}.") from None
    if any(v < 0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise UserError(f"pivots must be non-negative and strictly increasing, got {values}.")
    return values


def parse_alphas(alphas: str | Sequence[float] | None) -> list[float]:
    """``"0.4|0.3|0.2"``, ``"0.4,0.3,0.2"`` or a list → floats, each checked to be in [0, 1]."""
    if alphas is None or alphas == "":
        return []
    items = [a for a in re.split(r"[|,\s]+", alphas.strip().strip("[]")) if a] if isinstance(alphas, str) else alphas
    return [check_alpha(a, f"alphas[{i}]") for i, a in enumerate(items)]


@dataclass
class MergePlan:
    """α per tensor name plus a human-readable group per tensor (for the printed table)."""

    alphas: dict[str, float]
    groups: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        for name, alpha in self.alphas.items():
            check_alpha(alpha, f"alpha of tensor {name!r}")

    def __getitem__(self, name: str) -> float:
        return self.alphas[name]

    def __contains__(self, name: str) -> bool:
        return name in self.alphas

    def __len__(self) -> int:
        return len(self.alphas)

    def table(self) -> str:
        """One row per group: group, α, number of tensors (in first-seen order)."""
        rows: dict[tuple[str, float], int] = {}
        for name, alpha in self.alphas.items():
            key = (self.groups.get(name, name), alpha)
            rows[key] = rows.get(key, 0) + 1
        width = max([len("group")] + [len(g) for g, _ in rows])
        lines = [f"{'group':<{width}}  {'alpha':>8}  {'tensors':>7}"]
        lines += [f"{group:<{width}}  {alpha:>8.4f}  {count:>7}" for (group, alpha), count in rows.items()]
        header = [self.description, "θ = α·θ_base + (1−α)·θ_aligned"] if self.description else []
        return "\n".join(header + lines)

    __str__ = table

    def to_dict(self) -> dict:
        return {"description": self.description, "alphas": self.alphas, "groups": self.groups}

    def save(self, path: PathLike) -> Path:
        """Write JSON to ``path`` (a directory gets ``merge_plan.json`` inside)."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: PathLike) -> MergePlan:
        path = Path(path)
        path = path / PLAN_FILE if path.is_dir() else path
        data = read_json(path)
        require_keys(data, ("alphas",), path)
        if not isinstance(data["alphas"], dict):
            raise UserError(f"{str(path)!r}: 'alphas' must be an object mapping tensor names to α.")
        alphas = {name: check_alpha(alpha, f"{path} alphas[{name!r}]") for name, alpha in data["alphas"].items()}
        return cls(alphas=alphas, groups=data.get("groups", {}), description=data.get("description", ""))

    def __repr__(self) -> str:
        return f"MergePlan({len(self.alphas)} tensors, {self.description!r})"


def linear_plan(names: Iterable[str], alpha: float) -> MergePlan:
    """Every tensor gets the same α."""
    alpha = check_alpha(alpha, "alpha")
    names = list(names)
    return MergePlan(
        alphas=dict.fromkeys(names, alpha), groups=dict.fromkeys(names, "all"), description=f"linear α={alpha}"
    )


def partwise_plan(
    names: Iterable[str],
    pivots: str | Sequence[int],
    alphas: str | Sequence[float],
    embed_alpha: float | None = None,
    head_alpha: float | None = None,
    other_alpha: float | None = None,
    num_layers: int | None = None,
    tie_word_embeddings: bool = False,
    tied_block: str | None = None,
) -> MergePlan:
    """AMA's partwise plan (rules in the module docstring); ``num_layers`` defaults to max layer index + 1."""
    names = list(names)
    tied = _tied_choice(tie_word_embeddings, tied_block, embed_alpha, head_alpha)
    pivot_list, alpha_list = parse_pivots(pivots), parse_alphas(alphas)
    if len(alpha_list) != len(pivot_list) + 1:
        raise UserError(
            f"alphas: need one α per part, i.e. len(pivots) + 1 = {len(pivot_list) + 1}, got {len(alpha_list)} "
            f"(pivots {pivot_list}, alphas {alpha_list})."
        )
    indices = [i for i in map(layer_index, names) if i is not None]
    if num_layers is None:
        num_layers = max(indices) + 1 if indices else 0
    if pivot_list and pivot_list[-1] >= num_layers - 1:
        raise UserError(
            f"pivots: the last pivot ({pivot_list[-1]}) leaves the last part empty; the model has {num_layers} "
            f"layers (0–{num_layers - 1}), so pivots must be < {num_layers - 1}."
        )
    bounds = [-1, *pivot_list, num_layers - 1]
    part_names = [f"layers {lo + 1}–{hi}" for lo, hi in zip(bounds, bounds[1:])]
    embed = check_alpha(embed_alpha if embed_alpha is not None else alpha_list[0], "embed_alpha")
    head = check_alpha(head_alpha if head_alpha is not None else alpha_list[-1], "head_alpha")
    other = None if other_alpha is None else check_alpha(other_alpha, "other_alpha")

    plan_alphas: dict[str, float] = {}
    groups: dict[str, str] = {}
    unknown = []
    for name in names:
        role = tensor_role(name)
        if role == "layer":
            part = next(p for p, hi in enumerate(bounds[1:]) if layer_index(name) <= hi)
            plan_alphas[name], groups[name] = alpha_list[part], part_names[part]
        elif tied and (role == "head" or is_token_embedding(name)):
            plan_alphas[name] = embed if tied == "embed" else head
            groups[name] = TIED_GROUPS[tied]
        elif role == "embed":
            plan_alphas[name], groups[name] = embed, "embeddings"
        elif role in ("head", "final_norm"):
            plan_alphas[name], groups[name] = head, "lm_head + final norm"
        elif other is not None:
            plan_alphas[name], groups[name] = other, "other"
        else:
            unknown.append(name)
    if unknown:
        raise UserError(
            f"No partwise rule for tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: they are not in a "
            "decoder layer, the embeddings, lm_head or the final norm; pass other_alpha to average them."
        )
    description = f"partwise pivots={pivot_list} alphas={alpha_list} embed_alpha={embed} head_alpha={head}"
    if tied:
        description += f"; tied embeddings merged once with {tied}_alpha={embed if tied == 'embed' else head}"
    return MergePlan(alphas=plan_alphas, groups=groups, description=description)


def ties_embeddings(names: Iterable[str], config: dict) -> bool:
    """Whether the checkpoint's lm_head is its token embedding: ``tie_word_embeddings`` of its ``config.json``;
    without that key, whether it stores a token embedding and no head (a causal LM always has a head)."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    names = list(names)
    return any(map(is_token_embedding, names)) and not any(tensor_role(n) == "head" for n in names)


def partwise_builder(
    pivots: str | Sequence[int],
    alphas: str | Sequence[float],
    embed_alpha: float | None = None,
    head_alpha: float | None = None,
    other_alpha: float | None = None,
    tied_block: str | None = None,
):
    """A plan builder ``(tensor_names, config) → MergePlan`` for :func:`~hf_align.merging.merge_models`, the CLI and
    ``AMAMergeCallback``: the layer count and whether the embeddings are tied are read from the checkpoint's
    config, so a tied model's one tensor is merged once, in the block named (``tied_block``, see the module doc)."""
    _tied_choice(False, tied_block, embed_alpha, head_alpha)  # a bad tied_block fails now, not at merge time

    def build(names: list[str], config: dict) -> MergePlan:
        return partwise_plan(
            names, pivots, alphas, embed_alpha=embed_alpha, head_alpha=head_alpha, other_alpha=other_alpha,
            num_layers=config.get("num_hidden_layers"), tie_word_embeddings=ties_embeddings(names, config),
            tied_block=tied_block,
        )  # fmt: skip

    return build
