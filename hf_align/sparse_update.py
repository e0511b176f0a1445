"""Train only the neurons of a :class:`~hf_align.masks.NeuronMask`: frozen base weights plus small trainable deltas.

ALLO's scripts zero the gradients of frozen entries: every weight gradient is still computed, Adam keeps full-size
state, weight decay moves "frozen" entries and the reference needs a second model. Here instead:

* every base parameter is frozen; each masked parameter gets a trainable delta holding **only** its selected
  entries (element masks: a value vector at fixed flat indices) or rows (row masks: a ``k × in`` matrix);
* the effective weight is ``W + scatter(Δ)`` (one memory-bound add; unselected entries are copied bit for bit).
  It is a ``torch.nn.utils.parametrize`` parametrization, so anything that reads ``module.weight`` (TRL's fused
  ``lm_head``, tied embeddings) sees it;
* row-masked ``nn.Linear`` layers run one fused autograd function: a single GEMM forward, one for the input
  gradient and a ``k``-row GEMM for ``Δ`` -- the full weight gradient is never formed;
* :func:`deltas_disabled` switches every delta off: the model *is* its own reference policy, no copy in memory;
* optimizer state and weight decay only ever touch ``Δ``.

Delta checkpoints are ``neuron_deltas.safetensors`` + the mask (``NeuronMask.save``) in the same folder;
:func:`merged_state_dict` gives a plain transformers state dict with the deltas folded in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from hf_align.io import PathLike, load_tensors, save_tensors
from hf_align.masks import NeuronMask, _plain_parameters, parameter_shape


__all__ = [
    "DELTAS_FILE",
    "MaskedAdamW",
    "attach_deltas",
    "deltas_disabled",
    "has_deltas",
    "iter_deltas",
    "load_deltas",
    "merge_deltas",
    "merged_state_dict",
    "save_deltas",
    "trainable_fraction",
]

DELTAS_FILE = "neuron_deltas.safetensors"
_REQUIRES_GRAD_ATTR = "_hf_align_requires_grad"


class _Delta(torch.nn.Module):
    """Parametrization ``W ↦ W + scatter(Δ)``; ``Δ`` holds only the selected rows (``row``) or entries."""

    def __init__(self, name: str, mask: torch.Tensor, weight: torch.Tensor, row: bool):
        super().__init__()
        self.param_name = name
        self.row = row
        self.enabled = True
        index = mask.nonzero().view(-1) if row else mask.reshape(-1).nonzero().view(-1)
        int32 = weight.numel() < 2**31 and (weight.shape[0] if row else weight.numel()) < 2**31
        self.register_buffer(
            "index", index.to(torch.int32 if int32 else torch.int64).to(weight.device), persistent=False
        )
        shape = (index.numel(), *weight.shape[1:]) if row else (index.numel(),)
        self.delta = torch.nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.row:
            return weight.index_add(0, self.index, self.delta.to(weight.dtype))
        return weight.reshape(-1).index_add(0, self.index, self.delta.to(weight.dtype)).view_as(weight)


class _RowDeltaLinear(torch.autograd.Function):
    """``y = x (W + scatter_rows(Δ))ᵀ + b`` with ``∂Δ = g[..., rows]ᵀ x``: the weight gradient is ``k``-row sized."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta):
        effective = weight.index_add(0, index, delta.to(weight.dtype))
        ctx.save_for_backward(x, weight, index, delta)
        return F.linear(x, effective.to(x.dtype) if not torch.is_autocast_enabled() else effective, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, index, delta = ctx.saved_tensors
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            effective = weight.index_add(0, index, delta.to(weight.dtype))
            grad_x = (grad_out @ effective.to(grad_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[4]:
            rows = grad_out.index_select(-1, index).reshape(-1, index.numel())
            grad_delta = (rows.t() @ x.reshape(-1, x.shape[-1]).to(rows.dtype)).to(delta.dtype)
        return grad_x, None, None, None, grad_delta


def _row_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    holder = self.parametrizations.weight[0]
    weight = self.parametrizations.weight.original
    if not holder.enabled:
        return F.linear(x, weight, self.bias)
    return _RowDeltaLinear.apply(x, weight, self.bias, holder.index, holder.delta)


def _owners(model: torch.nn.Module, param: torch.Tensor) -> list[tuple[torch.nn.Module, str]]:
    """Every ``(module, attribute)`` that holds ``param`` (more than one for tied weights)."""
    owners = []
    for module in model.modules():
        for attr, candidate in module._parameters.items():
            if candidate is param:
                owners.append((module, attr))
    return owners


def attach_deltas(model: torch.nn.Module, mask: NeuronMask) -> torch.nn.Module:
    """Freeze ``model`` and give each masked parameter a trainable delta at its selected rows/entries (in place).

    Deltas take the parameter's dtype (fp32 under AMP/bf16 autocast when the weights are fp32). Returns ``model``.
    """
    if has_deltas(model):
        raise ValueError("This model already has neuron deltas attached; merge or remove them first.")
    mask.validate(model)
    params = dict(_plain_parameters(model))
    for name, param in params.items():
        if name in mask.masks and getattr(param, "quant_state", None) is not None:
            raise NotImplementedError(
                f"Parameter {name!r} is quantized (bitsandbytes 4-bit): neuron deltas on a quantized weight are not "
                "supported yet. Leave it out of the mask (target=...) or load the base in bf16."
            )
    setattr(model, _REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    model.requires_grad_(False)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, selected in mask.masks.items():
        if not bool(selected.any()):
            continue  # nothing selected: the parameter just stays frozen
        param = params[name]
        row = mask.is_row(name, parameter_shape(param))
        holder = _Delta(name, selected, param, row)
        for module, attr in _owners(model, param):
            fast = row and attr == "weight" and type(module) is torch.nn.Linear and module is not output_embeddings
            parametrize.register_parametrization(module, attr, holder)
            if fast:  # TRL's fused head reads lm_head.weight, not forward
                module.forward = _row_linear_forward.__get__(module)
    return model


def iter_deltas(model: torch.nn.Module) -> Iterator[_Delta]:
    """Each delta holder once (tied weights share one)."""
    seen = set()
    for module in model.modules():
        if isinstance(module, _Delta) and id(module) not in seen:
            seen.add(id(module))
            yield module


def has_deltas(model: torch.nn.Module) -> bool:
    return next(iter_deltas(model), None) is not None


@contextlib.contextmanager
def deltas_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model with every delta switched off: the frozen base, i.e. the reference policy."""
    holders = list(iter_deltas(model))
    states = [h.enabled for h in holders]
    for holder in holders:
        holder.enabled = False
    try:
        yield model
    finally:
        for holder, state in zip(holders, states, strict=True):
            holder.enabled = state


@contextlib.contextmanager
def _deltas_enabled(model: torch.nn.Module) -> Iterator[None]:
    holders = list(iter_deltas(model))
    states = [h.enabled for h in holders]
    for holder in holders:
        holder.enabled = True
    try:
        yield
    finally:
        for holder, state in zip(holders, states, strict=True):
            holder.enabled = state


def trainable_fraction(model: torch.nn.Module) -> float:
    """Trainable delta entries over the base model's parameter count."""
    trainable = sum(h.delta.numel() for h in iter_deltas(model))
    total = sum(parameter_shape_numel(p) for n, p in model.named_parameters() if not n.endswith(".delta"))
    return trainable / max(total, 1)


def parameter_shape_numel(param: torch.Tensor) -> int:
    shape = parameter_shape(param)
    numel = 1
    for size in shape:
        numel *= size
    return numel


def _plain_key(key: str) -> str | None:
    """``a.parametrizations.weight.original`` → ``a.weight``; delta keys → None; other keys unchanged."""
    if ".parametrizations." not in key:
        return key
    prefix, rest = key.split(".parametrizations.", 1)
    attr, tail = rest.split(".", 1)
    return f"{prefix}.{attr}" if tail == "original" else None


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain transformers state dict with the deltas folded in; ``model`` is not changed."""
    merged: dict[str, torch.Tensor] = {}
    by_original: dict[int, torch.Tensor] = {}
    with torch.no_grad(), _deltas_enabled(model):
        for key, value in model.state_dict(keep_vars=True).items():
            plain = _plain_key(key)
            if plain is None:
                continue
            if plain == key:
                merged[key] = value.detach()
                continue
            if id(value) not in by_original:  # tied weights: one merged tensor for every owner
                module = model.get_submodule(plain.rsplit(".", 1)[0]) if "." in plain else model
                by_original[id(value)] = getattr(module, plain.rsplit(".", 1)[-1]).detach().clone()
            merged[plain] = by_original[id(value)]
    return merged


def merge_deltas(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the deltas into the weights and remove them (in place): a plain model again. Returns ``model``."""
    folded = {}
    with torch.no_grad(), _deltas_enabled(model):
        for module in list(model.modules()):
            if not parametrize.is_parametrized(module):
                continue
            for attr in list(module.parametrizations.keys()):
                plist = module.parametrizations[attr]
                if not any(isinstance(p, _Delta) for p in plist):
                    continue
                original = plist.original
                if id(original) not in folded:
                    folded[id(original)] = (original, getattr(module, attr).detach().clone())
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                module.__dict__.pop("forward", None)
        for original, value in folded.values():
            original.data.copy_(value)
    flags = getattr(model, _REQUIRES_GRAD_ATTR, None)
    if flags is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, True))
        delattr(model, _REQUIRES_GRAD_ATTR)
    return model


def save_deltas(model: torch.nn.Module, directory: PathLike, mask: NeuronMask) -> Path:
    """Write the deltas (``neuron_deltas.safetensors``) and their mask into ``directory`` (small, push-able)."""
    directory = Path(directory)
    tensors = {h.param_name: h.delta.detach().to("cpu") for h in iter_deltas(model)}
    if not tensors:
        raise ValueError("The model has no neuron deltas to save (attach_deltas was not called).")
    mask.save(directory)
    save_tensors(directory / DELTAS_FILE, tensors, metadata={"format": "hf-align-neuron-deltas"})
    return directory


def load_deltas(model: torch.nn.Module, directory: PathLike) -> torch.nn.Module:
    """Load deltas saved by :func:`save_deltas` (attaching them first with the saved mask when needed)."""
    directory = Path(directory)
    tensors = load_tensors(directory / DELTAS_FILE)
    if not has_deltas(model):
        attach_deltas(model, NeuronMask.load(directory))
    holders = {h.param_name: h for h in iter_deltas(model)}
    if set(tensors) != set(holders):
        diff = sorted(set(tensors) ^ set(holders))
        raise ValueError(
            f"{str(directory / DELTAS_FILE)!r} holds deltas for other parameters than the model's mask "
            f"(e.g. {diff[0]!r}); was it saved with another mask?"
        )
    with torch.no_grad():
        for name, holder in holders.items():
            if tensors[name].shape != holder.delta.shape:
                raise ValueError(
                    f"Delta {name!r} in {str(directory / DELTAS_FILE)!r} has shape {tuple(tensors[name].shape)}, "
                    f"expected {tuple(holder.delta.shape)}."
                )
            holder.delta.copy_(tensors[name])
    return model


class MaskedAdamW(torch.optim.Optimizer):
    """ALLO's ``MaskAdamW_HF`` re-created for comparison: HF AdamW whose update is multiplied by the mask.

    Adam moments are kept for every entry and (decoupled) weight decay moves every entry, as in the reference code.
    Each param group carries ``"mask"`` (full-shape, or 1-D per output row). Prefer :func:`attach_deltas`.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "mask": None})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                grad = param.grad
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
                update = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])
                mask = group["mask"]
                if mask is not None:
                    mask = mask.to(param.device, param.dtype)
                    update.mul_(mask if mask.shape == param.shape else mask.view(-1, *([1] * (param.dim() - 1))))
                param.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss
