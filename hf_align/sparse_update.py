"""Train only the neurons of a :class:`~hf_align.masks.NeuronMask`: frozen base weights plus small trainable deltas.

ALLO's scripts zero the gradients of frozen entries: every weight gradient is still computed, Adam keeps full-size
state, weight decay moves "frozen" entries and the reference needs a second model. Here instead:

* every base parameter is frozen; each masked parameter gets a trainable delta holding **only** its selected
  entries (element masks: a value vector at fixed flat indices) or rows (row masks: a ``k × in`` matrix);
* the effective weight is ``W + scatter(Δ)`` (one memory-bound add; unselected entries are copied bit for bit).
  It is a ``torch.nn.utils.parametrize`` parametrization, so anything that reads ``module.weight`` (TRL's fused
  ``lm_head``, tied embeddings) sees it;
* row-masked ``nn.Linear`` layers run one fused autograd function: a single GEMM forward, one for the input
  gradient and a ``k``-row GEMM for ``Δ`` -- the full weight gradient is never formed; an element-masked one whose
  density is at most ``sampled_gradient_density`` computes only its selected entries of ``dW = dYᵀ X`` (a sampled
  GEMM, ``torch.sparse.sampled_addmm``), the others form ``dW`` and gather (``benchmarks/sampled_gradient.py``:
  the sampled one wins only on sparse modules, and in fp32 far more often than in bf16);
* :func:`deltas_disabled` switches every delta off: the model *is* its own reference policy, no copy in memory;
* optimizer state and weight decay only ever touch ``Δ``;
* a bitsandbytes 4-bit base (``Linear4bit``) takes row masks like QLoRA takes adapters: the delta lives in the
  compute dtype and the forward is the 4-bit forward plus ``out[..., rows] += x Δᵀ`` (one ``k``-row GEMM);
  :func:`merged_state_dict` dequantizes and adds the delta (a full-precision checkpoint). Element masks on a 4-bit
  weight are refused (its entries cannot move without re-quantizing).

Delta checkpoints are ``neuron_deltas.safetensors`` + the mask (``NeuronMask.save``) in the same folder;
:func:`merged_state_dict` gives a plain transformers state dict with the deltas folded in.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from hf_align import _compat
from hf_align.architectures import neuron_axes, neuron_axis
from hf_align.io import PathLike, apply_file_mode, load_tensors, save_tensors
from hf_align.masks import NeuronMask, _plain_parameters, parameter_shape
from hf_align.quantization import keep_4bit_trainable, restore_trainable_layout


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
    "quantized_training_allowed",
    "save_deltas",
    "save_model_with_deltas",
    "trainable_fraction",
]

DELTAS_FILE = "neuron_deltas.safetensors"
_REQUIRES_GRAD_ATTR = "_hf_align_requires_grad"
_DELTA_CHILD = "neuron_delta"  # a 4-bit Linear's delta holder (a submodule: its weight cannot be parametrized)


def _selected_index(mask: torch.Tensor, row: bool) -> torch.Tensor:
    return mask.nonzero().view(-1) if row else mask.reshape(-1).nonzero().view(-1)


class _Delta(torch.nn.Module):
    """Parametrization ``W ↦ W + scatter(Δ)``; ``Δ`` holds only the selected rows (``row``) or entries. A row is
    an output feature: along ``axis`` 0 of a Linear weight, axis 1 of a GPT-2 ``Conv1D`` weight (stored in × out)."""

    def __init__(
        self,
        name: str,
        mask: torch.Tensor,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        row: bool,
        axis: int = 0,
        sampled: bool = False,
    ):
        super().__init__()
        self.param_name = name
        self.row = row
        self.axis = axis if row else 0
        self.enabled = True
        index = _selected_index(mask, row)
        numel = 1
        for size in shape:
            numel *= size
        int32 = numel < 2**31
        self.register_buffer("index", index.to(torch.int32 if int32 else torch.int64).to(device), persistent=False)
        if row:
            delta_shape = list(shape)
            delta_shape[self.axis] = index.numel()
        else:
            delta_shape = [index.numel()]
        self.delta = torch.nn.Parameter(torch.zeros(delta_shape, dtype=dtype, device=device))
        self.sampled = sampled and not row
        crow, col = _csr_pattern(index, shape, device) if self.sampled else (None, None)
        self.register_buffer("crow", crow, persistent=False)  # moves with the model; None when dense
        self.register_buffer("col", col, persistent=False)

    @property
    def pattern(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sampled gradient's CSR pattern, or None (the dense weight gradient, gathered)."""
        return (self.crow, self.col) if self.sampled else None

    def extra_repr(self) -> str:
        return "sampled gradient" if self.sampled else ""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled or _is_partitioned(weight):
            return weight
        return _effective(weight, self.index, self.delta, self.row, self.axis)


def _csr_pattern(index: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Row pointers and column indices (int32) of the sorted flat ``index`` in a 2-D ``shape``: the sampled
    gradient's CSR pattern, whose values come out in ``index``'s (row-major) order."""
    rows, columns = shape
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(index // columns, minlength=rows).cumsum(0)
    return crow.to(torch.int32).to(device), (index % columns).to(torch.int32).to(device)


def _sampled_weight_grad(grad_2d: torch.Tensor, inputs: torch.Tensor, pattern: tuple[torch.Tensor, ...]):
    """``(dYᵀ X)`` at the pattern's entries only (fp32: CPU's sampled GEMM has no bf16 kernel; bf16 operands cast
    up exactly, so this is the dense GEMM's sum in another order, without rounding ``dW`` to bf16 first)."""
    crow, col = pattern
    size = (grad_2d.shape[1], inputs.shape[1])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": once per process, not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        values = grad_2d.new_zeros(col.numel(), dtype=torch.float32)
        sparse = torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)
        return torch.sparse.sampled_addmm(sparse, grad_2d.t().float(), inputs.float(), beta=0.0).values()


def _is_partitioned(weight: torch.Tensor) -> bool:
    """A ZeRO-3 weight read outside its module's gather (``repr``, a shape query): a slice, as DeepSpeed exposes
    it; there is nothing to add a delta to (inside a forward the owner has gathered it, see ``attach_deltas``)."""
    ds_shape = getattr(weight, "ds_shape", None)
    return ds_shape is not None and tuple(weight.shape) != tuple(ds_shape)


def _effective(
    weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, row: bool, axis: int = 0
) -> torch.Tensor:
    """``W + scatter(Δ)``: ``Δ`` added at the selected rows (``row``, along ``axis``) or flat entries; other entries
    copied as is. A delta that covers every entry is one dense add (the same single rounding, no scatter)."""
    delta = delta.to(weight.dtype)
    if delta.numel() == weight.numel():
        return weight + delta.view_as(weight)
    if row:
        return weight.index_add(axis, index, delta)
    return weight.reshape(-1).index_add(0, index, delta).view_as(weight)


@contextlib.contextmanager
def _delta_in_place(
    weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, row: bool
) -> Iterator[torch.Tensor]:
    """``W`` itself holds ``W + scatter(Δ)`` inside the block (rows along axis 0), then exactly ``W`` again.

    Building the effective weight out of place costs a full copy of ``W`` per forward and per backward (memory
    traffic and allocator churn); here only the ``k`` selected rows/entries are read, added to and copied back, so
    the frozen entries never move and the restore is bit-exact. The write goes through ``.data`` (its own version
    counter): autograd nodes that saved ``W`` see it unchanged by the time they run. A delta covering every entry,
    or a non-contiguous ``W``, takes the out-of-place add (restoring would copy all of ``W`` anyway).
    """
    if delta.numel() == weight.numel() or not weight.is_contiguous():
        yield _effective(weight, index, delta, row)
        return
    data = weight.data
    if row:
        saved = data.index_select(0, index)
        data.index_add_(0, index, delta.to(data.dtype))
        restore = functools.partial(data.index_put_, (index,), saved)
    else:  # scattered entries: gather/scatter are the fast kernels
        flat, entries = data.view(-1), index.long()
        saved = flat.gather(0, entries)
        flat.scatter_add_(0, entries, delta.to(flat.dtype))  # unique entries: one rounded add each, as index_add
        restore = functools.partial(flat.scatter_, 0, entries, saved)
    try:
        yield data
    finally:
        restore()


class _DeltaLinear(torch.autograd.Function):
    """``y = x (W + scatter(Δ))ᵀ + b`` for a Linear with a row or element delta, in one function.

    No merged weight is allocated or kept for backward: around each GEMM ``W`` holds ``W + scatter(Δ)`` in place
    and is restored exactly after (:func:`_delta_in_place`). Row deltas: ``∂Δ = g[..., rows]ᵀ x``, a ``k``-row GEMM
    instead of the full weight gradient. Element deltas: the full weight gradient at the selected entries, or, for
    a holder with a sampled ``pattern``, only those entries (:func:`_sampled_weight_grad`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta, row, pattern=None):
        ctx.row = row
        ctx.pattern = pattern
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:  # the GEMM's own operand, saved for backward in the autocast dtype as autograd's linear does
            x = _autocast_input(x)
        ctx.save_for_backward(x, weight, index, delta)
        with _delta_in_place(weight, index, delta, row) as effective:
            if autocast:  # F.linear casts the weight (and bias) like the plain layer would
                return F.linear(x, effective, bias)
            return F.linear(x, effective.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, index, delta = ctx.saved_tensors
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            with _delta_in_place(weight, index, delta, ctx.row) as effective:
                grad_x = (grad_out @ effective.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:  # a bias with its own (element) delta
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[4]:
            inputs = x.reshape(-1, x.shape[-1])
            grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
            if delta.numel() == weight.numel():  # every entry trains: the weight gradient is the delta's
                grad_delta = (grad_2d.t() @ inputs.to(grad_2d.dtype)).view_as(delta).to(delta.dtype)
            elif ctx.row:
                rows = grad_2d.index_select(-1, index)
                grad_delta = (rows.t() @ inputs.to(rows.dtype)).to(delta.dtype)
            elif ctx.pattern is not None:
                grad_delta = _sampled_weight_grad(grad_2d, inputs, ctx.pattern).to(delta.dtype)
            else:
                grad_weight = grad_2d.t() @ inputs.to(grad_2d.dtype)
                grad_delta = grad_weight.view(-1).gather(0, index.long()).to(delta.dtype)
        return grad_x, None, grad_bias, None, grad_delta, None, None


_last_cast: tuple | None = None  # (weakref to the input, its version, dtype, weakref to its cast)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype, cast once for the layers that read the same input (q/k/v, gate/up).

    Plain autocast casts an activation anew for every Linear and, where the weight trains, saves each copy; a delta
    layer must save its input (the delta's gradient reads it), so one shared low-precision copy is what it keeps:
    half the bytes of the fp32 input and one cast instead of three. Weak references only: the cache holds nothing.
    """
    global _last_cast
    dtype = torch.get_autocast_dtype(x.device.type)
    if not x.is_floating_point() or x.dtype in (dtype, torch.float64):  # what autocast leaves as is
        return x
    if _last_cast is not None:
        source, version, cast_dtype, cast_ref = _last_cast
        cast = cast_ref()
        if cast is not None and source() is x and version == x._version and cast_dtype == dtype:
            return cast
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, weakref.ref(cast))
    return cast


def _delta_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of a plain ``nn.Linear`` whose weight has a delta: one fused function instead of the parametrization."""
    holder = self.parametrizations.weight[0]
    weight = self.parametrizations.weight.original
    if not holder.enabled:
        return F.linear(x, weight, self.bias)
    return _DeltaLinear.apply(x, weight, self.bias, holder.index, holder.delta, holder.row, holder.pattern)


def _plain_linear_forward(cls: type) -> bool:
    """``nn.Linear`` or a subclass that keeps its forward (e.g. a model's own ``Linear`` with extra init): the fused
    function computes exactly that forward. A subclass with its own forward keeps the parametrization."""
    return issubclass(cls, torch.nn.Linear) and cls.forward is torch.nn.Linear.forward


def _row_4bit_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit`` forward plus ``out[..., rows] += x Δᵀ``: the 4-bit GEMM and one ``k``-row GEMM."""
    holder = getattr(self, _DELTA_CHILD)  # attach_deltas turned bitsandbytes' CPU inference repacking off
    out = type(self).forward(self, x)
    if not holder.enabled:
        return out
    # In the activations' dtype (the delta may be kept in fp32 while the layer computes in bf16): the output then
    # equals that of the merged full-precision weights.
    extra = F.linear(x, holder.delta.to(x.dtype))
    return out.index_add(-1, holder.index, extra.to(out.dtype))


def _compute_dtype(model: torch.nn.Module, module: torch.nn.Module) -> torch.dtype:
    """A 4-bit layer's compute dtype (set on its first forward, else the quantization config's, else fp32), which
    its delta trains in, as QLoRA's adapters do: never the bf16 storage dtype of the quantized weights."""
    if getattr(module, "compute_dtype", None) is not None:
        return module.compute_dtype
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    dtype = getattr(config, "bnb_4bit_compute_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _is_4bit(param: torch.Tensor) -> bool:
    return getattr(param, "quant_state", None) is not None


def _dequantized(module: torch.nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    restore_trainable_layout(module)
    weight = module.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(weight.quant_state.dtype)


def _owners(model: torch.nn.Module, param: torch.Tensor) -> list[tuple[torch.nn.Module, str]]:
    """Every ``(module, attribute)`` that holds ``param`` (more than one for tied weights)."""
    owners = []
    for module in model.modules():
        for attr, candidate in module._parameters.items():
            if candidate is param:
                owners.append((module, attr))
    return owners


def attach_deltas(
    model: torch.nn.Module,
    mask: NeuronMask,
    dtype: torch.dtype | None = None,
    sampled_gradient_density: float = 0.0,
) -> torch.nn.Module:
    """Freeze ``model`` and give each masked parameter a trainable delta at its selected rows/entries (in place).

    Deltas take the parameter's dtype (a 4-bit layer's: its compute dtype), or ``dtype`` when given: e.g. fp32
    deltas on a bf16 base keep small Adam updates that bf16 would round away, for 10 % of the weights' memory.
    ``sampled_gradient_density``: an element-masked ``nn.Linear`` whose selected fraction is at most this computes
    only its selected entries of the weight gradient (equal to the dense gradient up to float summation order;
    0 never, the default). Returns ``model``.
    """
    if has_deltas(model):
        raise ValueError("This model already has neuron deltas attached; merge or remove them first.")
    mask.validate(model)
    params = dict(_plain_parameters(model))
    for name in mask.masks:
        param = params[name]
        if not _is_4bit(param):
            continue
        if not mask.is_row(name, parameter_shape(param)):
            raise ValueError(
                f"Parameter {name!r} is a bitsandbytes 4-bit weight: an element mask cannot move single entries of a "
                "quantized weight. Use a row mask (granularity='row') for it, or leave it out of the mask (target=...)."
            )
        owners = _owners(model, param)
        if len(owners) != 1 or owners[0][1] != "weight" or not hasattr(owners[0][0], "compute_dtype"):
            raise ValueError(f"Parameter {name!r} is 4-bit but not the weight of one bitsandbytes Linear4bit layer.")
    keep_4bit_trainable(model)
    axes = neuron_axes(model)
    setattr(model, _REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    model.requires_grad_(False)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, selected in mask.masks.items():
        if not bool(selected.any()):
            continue  # nothing selected: the parameter just stays frozen
        param = params[name]
        shape = parameter_shape(param)
        row = mask.is_row(name, shape)
        if _is_4bit(param):
            module = _owners(model, param)[0][0]
            delta_dtype = dtype or _compute_dtype(model, module)
            module.add_module(_DELTA_CHILD, _Delta(name, selected, shape, delta_dtype, param.device, row=True))
            module.forward = _row_4bit_forward.__get__(module)
            continue
        owners = _owners(model, param)
        sampled = not row and len(owners) == 1 and _fused_linear(owners[0], output_embeddings)
        sampled = sampled and float(selected.float().mean()) <= sampled_gradient_density
        holder = _Delta(
            name, selected, shape, dtype or param.dtype, param.device, row, neuron_axis(axes, name), sampled
        )
        for module, attr in owners:
            fast = _fused_linear((module, attr), output_embeddings)
            # A ZeRO-3 weight is a partitioned slice here: torch's check (one call of the parametrization) would
            # add the full-shape delta to it; the parametrization keeps shape and dtype by construction.
            parametrize.register_parametrization(module, attr, holder, unsafe=hasattr(param, "ds_shape"))
            # DeepSpeed ZeRO-3 gathers a module's *own* parameters around its forward; `original` and the delta
            # live in child modules whose forward never runs, so the owner gathers its whole subtree instead.
            _compat.mark_zero3_leaf(module)
            if fast:  # TRL's fused head reads lm_head.weight, not forward: it keeps the parametrization
                module.forward = _delta_linear_forward.__get__(module)
    return model


def _fused_linear(owner: tuple[torch.nn.Module, str], output_embeddings: torch.nn.Module | None) -> bool:
    """Whether the owner's forward becomes the fused :class:`_DeltaLinear` (a plain Linear's weight, not the
    output head, whose weight TRL's fused loss reads directly)."""
    module, attr = owner
    plain_type = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    return attr == "weight" and _plain_linear_forward(plain_type) and module is not output_embeddings


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
def _deltas_switched(model: torch.nn.Module, enabled: bool) -> Iterator[torch.nn.Module]:
    """Every delta of ``model`` on (``enabled``) or off for the block; each holder's own state comes back after."""
    holders = list(iter_deltas(model))
    states = [h.enabled for h in holders]
    for holder in holders:
        holder.enabled = enabled
    try:
        yield model
    finally:
        for holder, state in zip(holders, states, strict=True):
            holder.enabled = state


def deltas_disabled(model: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
    """The model with every delta switched off: the frozen base, i.e. the reference policy."""
    return _deltas_switched(model, enabled=False)


def trainable_fraction(model: torch.nn.Module) -> float:
    """Trainable delta entries over the base model's parameter count."""
    trainable = sum(parameter_shape_numel(h.delta) for h in iter_deltas(model))  # ZeRO-3: full, not the slice
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


def _delta_entries(model: torch.nn.Module) -> Iterator[tuple[_Delta, str, str, str]]:
    """``(holder, delta key, original key, plain key)`` for every parametrized owner, as ``model.state_dict()``
    names them (a tied weight: one entry per owner, the same holder)."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        for attr, plist in module.parametrizations.items():
            for i, holder in enumerate(plist):
                if isinstance(holder, _Delta):
                    base = f"{prefix}parametrizations.{attr}"
                    yield holder, f"{base}.{i}.delta", f"{base}.original", f"{prefix}{attr}"


def _merged_from_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the deltas into a *full* state dict of ``model`` (what a sharded engine gathered), using the model only
    for where each delta sits (its index buffers are never sharded)."""
    merged: dict[str, torch.Tensor] = {}
    deltas = {id(h): state_dict[key] for h, key, _, _ in _delta_entries(model) if key in state_dict}
    for holder, _, original_key, plain in _delta_entries(model):
        if original_key not in state_dict:  # a tied owner the engine left out of its gathered dict
            continue
        if id(holder) not in deltas:
            raise ValueError(f"The gathered state dict has {original_key!r} but not its neuron delta.")
        weight = state_dict[original_key].detach()
        index = holder.index.to(weight.device)
        merged[plain] = _effective(
            weight, index, deltas[id(holder)].detach().to(weight.device), holder.row, holder.axis
        )
    for key, value in state_dict.items():
        plain = _plain_key(key)
        if plain is not None and plain not in merged:
            merged[plain] = value.detach()
    return merged


def merged_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The plain transformers state dict with the deltas folded in; ``model`` is not changed.

    ``state_dict``: the model's full state dict as a sharded engine gathered it (DeepSpeed ZeRO-3, FSDP2), whose
    live parameters are only slices; the deltas are folded into it instead of into the live weights. Without it,
    a sharded model is gathered here: under ZeRO-3 / FSDP2 every rank must call this (each gets the full dict).
    """
    if state_dict is not None:
        return _merged_from_state_dict(model, state_dict)
    params = list(model.parameters())
    if any(hasattr(p, "full_tensor") for p in params):  # FSDP2: gather the full state dict (a collective)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
        return _merged_from_state_dict(model, full)
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gathered module by module (collectives)
        return _merged_from_state_dict(model, _zero3_full_state_dict(model))
    return _merged_live(model)


def _zero3_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value, gathered one module at a time: the peak is the result plus one module's
    parameters, not the whole model gathered at once next to its copy (a 70B model on every rank twice)."""
    import deepspeed

    full: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([param for _, param in own]):
            for name, param in own:
                full[f"{module_name}.{name}" if module_name else name] = param.detach().clone()
    for key, value in model.state_dict().items():  # buffers (never partitioned)
        full.setdefault(key, value.detach())
    return full


def _merged_live(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """:func:`merged_state_dict` from the model's own (full) parameters."""
    merged: dict[str, torch.Tensor] = {}
    by_original: dict[int, torch.Tensor] = {}
    quantized = {name: module for name, module in model.named_modules() if _is_4bit(getattr(module, "weight", None))}
    with torch.no_grad(), _deltas_switched(model, enabled=True):
        for key, value in model.state_dict(keep_vars=True).items():
            prefix = key.rsplit(".weight", 1)[0] if ".weight" in key else None
            if prefix in quantized and key.startswith(f"{prefix}.weight"):
                if key == f"{prefix}.weight":  # dequantized (+ delta); the quant-state entries are dropped
                    module = quantized[prefix]
                    weight = _dequantized(module)
                    holder = getattr(module, _DELTA_CHILD, None)
                    if holder is not None:
                        weight = _effective(weight, holder.index, holder.delta, row=True)
                    merged[key] = weight
                continue
            if key.endswith(f"{_DELTA_CHILD}.delta"):
                continue
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
    """Fold the deltas into the weights and remove them (in place): a plain model again. Returns ``model``.

    A 4-bit base cannot take the deltas without re-quantizing: use :func:`merged_state_dict` (full precision).
    """
    quantized = [n for n, m in model.named_modules() if isinstance(getattr(m, _DELTA_CHILD, None), _Delta)]
    if quantized:
        raise ValueError(
            f"{quantized[0]!r} is a bitsandbytes 4-bit layer with a neuron delta: it cannot be merged in place "
            "without re-quantizing. Use merged_state_dict(model) for a full-precision merged checkpoint."
        )
    folded = {}
    with torch.no_grad(), _deltas_switched(model, enabled=True):
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


def save_deltas(
    model: torch.nn.Module, directory: PathLike, mask: NeuronMask, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the deltas (``neuron_deltas.safetensors``) and their mask into ``directory`` (small, push-able).

    ``state_dict``: a full state dict gathered by a sharded engine; the deltas are read from it (the live ones are
    slices under ZeRO-3 / FSDP2).
    """
    directory = Path(directory)
    if state_dict is None:
        tensors = {h.param_name: h.delta.detach().to("cpu") for h in iter_deltas(model)}
    else:
        tensors = {}
        for holder, key, _, _ in _delta_entries(model):
            if holder.param_name not in tensors and key in state_dict:
                tensors[holder.param_name] = state_dict[key].detach().to("cpu").contiguous()
        for holder in iter_deltas(model):
            if holder.param_name not in tensors:
                raise ValueError(f"The gathered state dict has no neuron delta for {holder.param_name!r}.")
    if not tensors:
        raise ValueError("The model has no neuron deltas to save (attach_deltas was not called).")
    _check_same_mask(model, mask, "save_deltas: `mask`")
    mask.save(directory)
    save_tensors(directory / DELTAS_FILE, tensors, metadata={"format": "hf-align-neuron-deltas"})
    return directory


def _check_same_mask(model: torch.nn.Module, mask: NeuronMask, what: str) -> None:
    """Raise unless ``mask`` selects exactly the rows/entries the model's deltas sit at."""
    holders = {h.param_name: h for h in iter_deltas(model)}
    selected = {name: m for name, m in mask.masks.items() if bool(m.any())}
    if set(selected) != set(holders):
        diff = sorted(set(selected) ^ set(holders))
        raise ValueError(f"{what} selects other parameters than the model's deltas (e.g. {diff[0]!r}).")
    for name, holder in holders.items():
        index = _selected_index(selected[name], holder.row)
        if index.numel() != holder.index.numel() or not torch.equal(index, holder.index.to("cpu", index.dtype)):
            raise ValueError(
                f"{what} selects other {'rows' if holder.row else 'entries'} of {name!r} than the model's deltas: "
                "it is another mask than the one the deltas were attached with."
            )


def load_deltas(model: torch.nn.Module, directory: PathLike, revision: str | None = None) -> torch.nn.Module:
    """Load deltas saved by :func:`save_deltas` (attaching them first with the saved mask when needed) from a
    folder or a Hub repo id (``revision``: branch, tag or commit; :func:`hf_align.hub.resolve_local`)."""
    from hf_align.hub_download import resolve_local
    from hf_align.masks import MASK_FILE, MASK_META_FILE

    directory = resolve_local(directory, revision, [DELTAS_FILE, MASK_FILE, MASK_META_FILE], what="neuron deltas")
    tensors = load_tensors(directory / DELTAS_FILE)
    saved_mask = NeuronMask.load(directory)
    if not has_deltas(model):
        attach_deltas(model, saved_mask)
    else:
        _check_same_mask(model, saved_mask, f"The mask in {str(directory)!r}")
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


def save_model_with_deltas(
    model: torch.nn.Module,
    output_dir: PathLike,
    mask: NeuronMask,
    save_merged: bool = True,
    keep_deltas: bool = False,
    deltas_dir: str = "neuron_deltas",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The trainers' save: a plain transformers checkpoint with the deltas merged (``save_merged``), and/or the
    deltas + mask (into ``output_dir`` when not merged, else into ``output_dir/deltas_dir`` if ``keep_deltas``).

    A 4-bit base is saved merged in full precision (its compute dtype) with a config that no longer asks for
    quantization, so ``AutoModelForCausalLM.from_pretrained`` loads it as an ordinary model.

    ``state_dict``: the full state dict a sharded engine gathered (the Trainer's under ZeRO-3 / FSDP2); merged and
    delta files are built from it, so they equal a single process's.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    quantized = getattr(model.config, "quantization_config", None) is not None
    if save_merged and not quantized:
        model.save_pretrained(output_dir, state_dict=merged_state_dict(model, state_dict))
    elif save_merged:
        from huggingface_hub import save_torch_state_dict

        state = merged_state_dict(model)
        config = copy.deepcopy(model.config)
        del config.quantization_config
        config.dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        config.save_pretrained(output_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(output_dir)
        save_torch_state_dict(state, output_dir, max_shard_size="5GB")
    else:
        model.config.save_pretrained(output_dir)
    if keep_deltas or not save_merged:
        save_deltas(model, output_dir / deltas_dir if save_merged else output_dir, mask, state_dict)
    apply_file_mode(output_dir)  # safetensors writes 0600 whatever the umask


@contextlib.contextmanager
def quantized_training_allowed(model: torch.nn.Module | str | None = None) -> Iterator[None]:
    """Let ``transformers.Trainer`` accept a quantized model whose trainable parameters are neuron deltas.

    transformers refuses to train a quantized model that has no PEFT adapter; deltas play that role here. Only
    models with deltas are let through. TRL's DPO casts every trainable parameter of a quantized model to bf16 (for
    QLoRA adapters; it spares DoRA's magnitude vector because small Adam updates vanish in bf16, trl#7268). Deltas
    are weight updates, where that matters as much: the deltas of ``model`` get back the dtype they had on entry.
    """
    import transformers.trainer as hf_trainer

    original = hf_trainer.validate_quantization_for_training
    holders = list(iter_deltas(model)) if isinstance(model, torch.nn.Module) else []  # a path: nothing attached
    dtypes = [holder.delta.dtype for holder in holders]

    def validate(model):
        if not has_deltas(model):
            original(model)

    hf_trainer.validate_quantization_for_training = validate
    try:
        yield
    finally:
        hf_trainer.validate_quantization_for_training = original
        for holder, dtype in zip(holders, dtypes, strict=True):
            if holder.delta.dtype != dtype:
                holder.delta.data = holder.delta.data.to(dtype)


class MaskedAdamW(torch.optim.Optimizer):
    """ALLO's ``MaskAdamW_HF`` re-created for comparison: HF AdamW whose update is multiplied by the mask.

    Adam moments are kept for every entry and (decoupled) weight decay moves every entry, as in the reference code.
    Each param group carries ``"mask"`` (full-shape, or 1-D per output feature along the group's ``"axis"``,
    default 0; 1 for a ``Conv1D`` weight). Prefer :func:`attach_deltas`.
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
                    if mask.shape != param.shape:  # one entry per output feature, along the group's "axis"
                        view = [1] * param.dim()
                        view[group.get("axis", 0)] = -1
                        mask = mask.view(view)
                    update.mul_(mask)
                param.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss
