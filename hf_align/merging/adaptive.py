"""Adaptive model averaging (AMA proper, arXiv 2309.06256, ``mask_norm_sigmoid_linear``).

Every ``nn.Linear`` of the aligned model is replaced by an :class:`InterpolatedLinear` that computes
``W = α·W0 + (1−α)·W1`` on the fly from *references* to the base (θ0) and aligned (θ1) weights (bias likewise),
so no third copy of the model exists. ``mask_level="blockK"`` splits the L decoder layers into K blocks of ⌊L/K⌋
layers (the last takes the rest); block b has one raw parameter ``s_b`` (initialised to logit(init_val)) and
``lm_head`` its own ``s_h``. Effective ratios, as in the reference code::

    α_b = init_val · (σ(s_b) + ε) / Σ_j (σ(s_j) + ε) · K       (j over the K block parameters)
    α_h = init_val · (σ(s_h) + ε) / Σ_j (σ(s_j) + ε) · K       (lm_head: same denominator, not part of the sum)

Loss = causal-LM loss + ``reg_alpha · Σ_linear c(layer) · |α − init_val|`` (one term per wrapped Linear), with
``c = 1`` (``reg_type="l1"``) or ``c = reg_center_weight / (|layer − reg_center| + 1)`` (``"weighted"``; the code's
25/(|layer−13|+1) for a 26-layer model; lm_head counts as layer L). Only the s parameters train.

Not-Linear tensors (embeddings, norms) are not learned: like the reference (training and merge script) they
come from the base model (``non_linear_alpha=1``); set another fixed α if you prefer. With tied embeddings the
head *is* the token embedding, one tensor merged once in the block the user names (``tied_block``): ``"head"``
(default) learns its α as lm_head's (the embedding lookup is interpolated with the same α, so training and merge
agree), ``"embed"`` keeps it at ``non_linear_alpha`` and learns no head α. The reference *merge* script ignores the
learned head α and uses init_val; we use the learned one (what was optimised) unless ``merge_head_alpha`` is given.
An α whose raw parameter never moved from its start is not "learned": the merge warns once and the plan says so.

This module is the math, the modules and the α file format only; the training loop that learns the α's is
:class:`hf_align.trainers.AdaptiveMergeTrainer` (core never imports trainers).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_align.architectures import layer_index
from hf_align.config_checks import check_choice
from hf_align.errors import UserError
from hf_align.io import PathLike, load_tensors, read_json, save_tensors, write_json
from hf_align.merging.plan import TIED_BLOCKS, MergePlan, check_alpha


ALPHAS_TENSORS = "ama_alphas.safetensors"
ALPHAS_JSON = "ama_alphas.json"
logger = logging.getLogger(__name__)


def block_assignment(num_layers: int, mask_level: str) -> list[int]:
    """Block index of every layer: ``blockK`` → K blocks of ⌊L/K⌋ layers, the last takes the rest;
    ``layerwise`` → one block per layer."""
    if mask_level == "layerwise":
        return list(range(num_layers))
    if not (mask_level.startswith("block") and mask_level[5:].isdigit() and int(mask_level[5:]) > 0):
        raise ValueError(f"mask_level must be 'blockK' (e.g. 'block3') or 'layerwise', got {mask_level!r}.")
    blocks = int(mask_level[5:])
    per_block = num_layers // blocks
    if per_block == 0:
        raise ValueError(f"mask_level {mask_level!r}: {blocks} blocks but the model has only {num_layers} layers.")
    return [min(layer // per_block, blocks - 1) for layer in range(num_layers)]


def normalized_alphas(
    block_params: torch.Tensor, head_param: torch.Tensor, init_val: float, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α per block, α of lm_head) from the raw parameters (formula in the module docstring)."""
    weights = torch.sigmoid(block_params) + epsilon
    scale = init_val * block_params.numel() / weights.sum()
    return weights * scale, (torch.sigmoid(head_param) + epsilon) * scale


def reg_weight(layer: float, reg_type: str, center: float, center_weight: float) -> float:
    """c(layer): 1 for ``l1``; ``center_weight / (|layer − center| + 1)`` for ``weighted``."""
    if reg_type == "l1":
        return 1.0
    if reg_type == "weighted":
        return center_weight / (abs(layer - center) + 1.0)
    raise ValueError(f"reg_type must be 'l1' or 'weighted', got {reg_type!r}.")


class AlphaParameters(nn.Module):
    """The only trainable tensors: one raw ``s`` per block and one for ``lm_head``."""

    def __init__(self, num_blocks: int, init_val: float, epsilon: float):
        super().__init__()
        start = math.log(init_val / (1 - init_val))
        self.blocks = nn.Parameter(torch.full((num_blocks,), start, dtype=torch.float32))
        # shape (1,), not a 0-dim scalar: DeepSpeed's engine (ZeRO-1/2) cannot broadcast a 0-dim parameter
        self.head = nn.Parameter(torch.full((1,), start, dtype=torch.float32))
        self.init_val, self.epsilon = init_val, epsilon

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return normalized_alphas(self.blocks, self.head[0], self.init_val, self.epsilon)


class InterpolatedLinear(nn.Module):
    """``F.linear(x, α·W0 + (1−α)·W1, α·b0 + (1−α)·b1)`` with W0, W1 held by reference (frozen buffers)."""

    def __init__(self, base: nn.Linear, aligned: nn.Linear, alphas: AlphaParameters, block: int | None):
        super().__init__()
        self.register_buffer("base_weight", base.weight.detach(), persistent=False)
        self.register_buffer("aligned_weight", aligned.weight.detach(), persistent=False)
        has_bias = aligned.bias is not None
        self.register_buffer("base_bias", base.bias.detach() if has_bias else None, persistent=False)
        self.register_buffer("aligned_bias", aligned.bias.detach() if has_bias else None, persistent=False)
        self.in_features, self.out_features = aligned.in_features, aligned.out_features
        self.block = block  # None: lm_head
        object.__setattr__(self, "_alphas", alphas)  # shared; registered once on the model, not per module

    def alpha(self) -> torch.Tensor:
        blocks, head = self._alphas()
        return head if self.block is None else blocks[self.block]

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects .weight (dtype/device checks, generation)
        return self.aligned_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha().to(self.aligned_weight.dtype)
        weight = self.aligned_weight + alpha * (self.base_weight - self.aligned_weight)
        bias = None
        if self.aligned_bias is not None:
            bias = self.aligned_bias + alpha * (self.base_bias - self.aligned_bias)
        return F.linear(x, weight, bias)


class InterpolatedEmbedding(nn.Module):
    """The lookup of a tied embedding with lm_head's α: rows of ``α·E0 + (1−α)·E1``, E0/E1 held by reference."""

    def __init__(self, base: nn.Embedding, aligned: nn.Embedding, alphas: AlphaParameters):
        super().__init__()
        self.register_buffer("base_weight", base.weight.detach(), persistent=False)
        self.register_buffer("aligned_weight", aligned.weight.detach(), persistent=False)
        self.num_embeddings, self.embedding_dim = aligned.weight.shape
        self.padding_idx = getattr(aligned, "padding_idx", None)
        object.__setattr__(self, "_alphas", alphas)

    @property
    def weight(self) -> torch.Tensor:
        return self.aligned_weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        alpha = self._alphas()[1].to(self.aligned_weight.dtype)
        aligned = F.embedding(input_ids, self.aligned_weight)
        return aligned + alpha * (F.embedding(input_ids, self.base_weight) - aligned)


def _ties_embeddings(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def wrap_for_adaptive_merge(
    model: nn.Module,
    base_model: nn.Module,
    mask_level: str,
    init_val: float,
    epsilon: float,
    non_linear_alpha: float,
    tied_block: str = "head",
) -> tuple[AlphaParameters, dict[str, int | None], int, str | None]:
    """Freeze both models, replace every Linear of ``model`` by an :class:`InterpolatedLinear`, set the other
    parameters to ``non_linear_alpha``·θ0 + (1−α)·θ1 in place; returns (alphas, module → block, num_layers, the
    module name of a tied input embedding or ``None``). ``tied_block``: see the module docstring."""
    check_choice("tied_block", tied_block, TIED_BLOCKS)
    base_modules = dict(base_model.named_modules())
    base_params = dict(base_model.named_parameters())
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    indices = [layer_index(f"{n}.") for n in linear_names]
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    num_layers = num_layers or max(i for i in indices if i is not None) + 1
    blocks = block_assignment(num_layers, mask_level)
    alphas = AlphaParameters(max(blocks) + 1, init_val, epsilon)
    for param in [*model.parameters(), *base_model.parameters()]:
        param.requires_grad_(False)
    tied = _ties_embeddings(model)
    if tied != _ties_embeddings(base_model):
        raise UserError(
            f"tie_word_embeddings differs: the aligned model {'ties' if tied else 'does not tie'} lm_head to the "
            f"embedding, the base model {'does not' if tied else 'does'}; they cannot be averaged tensor by tensor."
        )
    output_embeddings = model.get_output_embeddings()
    tied_name = _module_name(model, model.get_input_embeddings()) if tied else None
    modules: dict[str, int | None] = {}
    for name, index in zip(linear_names, indices):
        module = model.get_submodule(name)
        if tied and tied_block == "embed" and module is output_embeddings:
            continue
        if name not in base_modules or base_modules[name].weight.shape != module.weight.shape:
            raise ValueError(f"base model has no Linear {name!r} with shape {tuple(module.weight.shape)}.")
        if index is None and module is not output_embeddings:
            raise ValueError(f"Linear {name!r} is neither in a decoder layer nor the lm_head; cannot assign a block.")
        block = None if index is None else blocks[index]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, InterpolatedLinear(base_modules[name], module, alphas, block))
        modules[name] = block
    if tied and tied_block == "head":  # the embedding lookup follows the head's α: one tensor, one α
        base_embedding = base_model.get_submodule(tied_name)
        model.set_input_embeddings(InterpolatedEmbedding(base_embedding, model.get_input_embeddings(), alphas))
    for name, param in model.named_parameters():
        if name not in base_params:
            raise ValueError(f"base model has no parameter {name!r}.")
        if non_linear_alpha != 0.0:
            param.data.lerp_(base_params[name].data.to(param.dtype), non_linear_alpha)
    model.add_module("ama_alphas", alphas)
    return alphas, modules, num_layers, tied_name


@dataclass
class LearnedAlphas:
    """What adaptive AMA learned; enough to rebuild the per-tensor plan for the streaming merge."""

    init_val: float
    epsilon: float
    mask_level: str
    num_layers: int
    block_params: list[float]
    head_param: float
    modules: dict[str, int | None]  # wrapped Linear module → block (None: lm_head)
    non_linear_alpha: float = 1.0
    block_alphas: list[float] = field(default_factory=list)
    head_alpha: float = 0.0
    tied_embedding: str | None = None  # module name of a tied input embedding (None: not tied)
    tied_block: str | None = None  # "head" or "embed" when tied: whose α the tied tensor takes

    def __post_init__(self):
        blocks, head = normalized_alphas(
            torch.tensor(self.block_params, dtype=torch.float64),
            torch.tensor(self.head_param, dtype=torch.float64),
            self.init_val,
            self.epsilon,
        )
        self.block_alphas, self.head_alpha = blocks.tolist(), float(head)

    @property
    def head_learned(self) -> bool:
        """Whether lm_head had an α to learn (not with a tied embedding kept in the embedding block)."""
        return None in self.modules.values()

    def unmoved(self) -> list[str]:
        """The α's whose raw parameter is still its start value logit(init_val): nothing was learned for them."""
        start = torch.tensor(math.log(self.init_val / (1 - self.init_val)), dtype=torch.float32)
        blocks = torch.tensor(self.block_params, dtype=torch.float32)
        names = [f"block {i}" for i in torch.nonzero(blocks == start).flatten().tolist()]
        head_moved = torch.tensor(self.head_param, dtype=torch.float32) != start
        return names + ([] if head_moved or not self.head_learned else ["lm_head"])

    def summary(self, merge_head_alpha: float | None = None) -> str:
        """α per block and of lm_head, each marked when it was not learned (the line the CLI and the plan print)."""
        unmoved = set(self.unmoved())

        def shown(value: float, name: str) -> str:
            return f"{value:.4f}" + (" (start value, not learned)" if name in unmoved else "")

        blocks = ", ".join(shown(a, f"block {i}") for i, a in enumerate(self.block_alphas))
        if merge_head_alpha is not None:
            head = f"{merge_head_alpha:.4f} (merge_head_alpha)"
        elif not self.head_learned:
            head = f"not learned (tied to the embeddings, α={self.non_linear_alpha:g})"
        else:
            head = shown(self.head_alpha, "lm_head")
        tied = f"; tied embeddings merged once in the {self.tied_block} block" if self.tied_embedding else ""
        return f"α per block: [{blocks}], lm_head: {head}{tied}"

    def save(self, directory: PathLike) -> None:
        directory = Path(directory)
        tensors = {"blocks": torch.tensor(self.block_params), "head": torch.tensor([self.head_param])}
        save_tensors(
            directory / ALPHAS_TENSORS, tensors, metadata={"format": "pt", "method": "mask_norm_sigmoid_linear"}
        )
        write_json(directory / ALPHAS_JSON, asdict(self))

    @classmethod
    def load(cls, directory: PathLike) -> LearnedAlphas:
        directory = Path(directory)
        data = read_json(directory / ALPHAS_JSON)
        tensors = load_tensors(directory / ALPHAS_TENSORS)
        data["block_params"], data["head_param"] = tensors["blocks"].tolist(), float(tensors["head"][0])
        data.pop("block_alphas", None), data.pop("head_alpha", None)
        return cls(**data)


def adaptive_plan(learned: LearnedAlphas, names: list[str], merge_head_alpha: float | None = None) -> MergePlan:
    """Per-tensor α for the streaming merge: wrapped Linear weights/biases get their block's (or the head's)
    learned α; every other tensor gets ``learned.non_linear_alpha`` (as during training)."""
    head = learned.head_alpha if merge_head_alpha is None else check_alpha(merge_head_alpha, "merge_head_alpha")
    unmoved = [name for name in learned.unmoved() if name != "lm_head" or merge_head_alpha is None]
    if unmoved:
        logger.warning(
            f"adaptive merge: the α of {', '.join(unmoved)} did not move from its start value (no gradient reached "
            "it, or the learning rate is too small); it is merged at that value and not reported as learned."
        )
    alphas: dict[str, float] = {}
    groups: dict[str, str] = {}
    for name in names:
        module, _, kind = name.rpartition(".")
        if module == learned.tied_embedding and kind == "weight":
            in_head = learned.tied_block == "head"
            alphas[name] = head if in_head else learned.non_linear_alpha
            groups[name] = "lm_head (tied embeddings)" if in_head else "embeddings (tied with lm_head, not Linear)"
        elif kind in ("weight", "bias") and module in learned.modules:
            block = learned.modules[module]
            alphas[name] = head if block is None else learned.block_alphas[block]
            groups[name] = "lm_head" if block is None else f"block {block} Linear"
        else:
            alphas[name] = learned.non_linear_alpha
            groups[name] = "not Linear (embeddings, norms)"
    description = f"adaptive {learned.mask_level} init={learned.init_val} ε={learned.epsilon}: {learned.summary(merge_head_alpha)}"
    return MergePlan(alphas=alphas, groups=groups, description=description)
