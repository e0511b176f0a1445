"""``AlignerAttention``: a PEFT tuner layer wrapping one decoder layer's self-attention.

The wrapped forward is the architecture's own attention forward (q/k/v projections, optional q/k
norm, RoPE, KV cache, ``ALL_ATTENTION_FUNCTIONS`` dispatch to eager/sdpa/flash) plus one extra term
before ``o_proj``: ``g * softmax(q K_p^T * scaling) V_p`` where ``K_p``/``V_p`` are the global tokens
projected by this layer's own ``k_proj``/``v_proj``. The attention computation is restated here
because the queries after RoPE are not observable from outside ``forward``; the supported
architectures and their few differences are listed in ``ATTENTION_SPECS`` and every one is tested
against the unwrapped model (identity at init, eager and sdpa, padded batches, KV cache).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hf_align import _compat


def _sliding_window_from_module(attn: nn.Module) -> int | None:
    return attn.sliding_window


def _sliding_window_from_config(attn: nn.Module) -> int | None:
    return getattr(attn.config, "sliding_window", None)


@dataclass(frozen=True)
class AttentionSpec:
    """What differs between the supported attention classes (everything else is shared)."""

    model_type: str
    qk_norm: bool = False
    sliding_window: Callable[[nn.Module], int | None] | None = None


ATTENTION_SPECS: dict[str, AttentionSpec] = {
    "LlamaAttention": AttentionSpec("llama"),
    "MistralAttention": AttentionSpec("mistral", sliding_window=_sliding_window_from_config),
    "Qwen2Attention": AttentionSpec("qwen2", sliding_window=_sliding_window_from_module),
    # Qwen3 normalises q and k per head before RoPE. The prefix keys go through k_norm too: it is part of
    # how this layer makes keys, and without it their logits would live on a different scale than the
    # normalised queries expect (lit-llama's Llama had no k_norm; the "no norm" of the paper is the block's
    # input RMSNorm, which the global tokens skip in every architecture).
    "Qwen3Attention": AttentionSpec("qwen3", qk_norm=True, sliding_window=_sliding_window_from_module),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(spec.model_type for spec in ATTENTION_SPECS.values())


def _repeat_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, N, hd) -> (B, kv_heads * groups, N, hd), the GQA layout of ``repeat_kv``."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _register_zero3_external(module: nn.Module, parameter: nn.Parameter) -> None:
    """DeepSpeed ZeRO-3 gathers a module's own parameters around its forward (and backward); the global tokens of
    another layer are registered as an external parameter of every layer that reads them, so they are gathered
    there too. The parameter stays one parameter: one copy, one gradient."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        deepspeed.zero.register_external_parameter(module, parameter)


def _full(tokens: torch.Tensor) -> torch.Tensor:
    """FSDP2 shards the tokens with their owner (the first adapted layer's unit) and reshards them after its
    forward: a later layer reads a sharded DTensor, gathered here."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tokens, DTensor):
            return tokens.full_tensor()
    return tokens


class _AddDeferredGrads(torch.autograd.Function):
    """The identity; its backward adds the gradients the later layers left in ``pending`` (and empties it)."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, pending: list) -> torch.Tensor:
        ctx.pending = pending
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        while ctx.pending:
            grad = grad + ctx.pending.pop()
        return grad, None


def _shared_tokens(embedding: nn.Embedding, owner: bool) -> torch.Tensor:
    """The global tokens as one layer uses them, with ONE gradient for the parameter per backward.

    The layers after the owner use a detached copy and leave its gradient in a list on the embedding; the owner's
    use (whose backward runs last: it is the first adapted layer) adds them, so the parameter's gradient is
    accumulated once, inside its owner: what a sharded engine expects of a parameter of that layer's unit (FSDP2
    reduce-scatters that unit's gradients; DeepSpeed ZeRO-3 with reentrant checkpointing, which TRL forces for PEFT,
    would otherwise reduce the parameter once per checkpointed layer and fail)."""
    weight = embedding.weight
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return _full(weight)
    pending = embedding.__dict__.setdefault("_aligner_pending_grads", [])
    if owner:
        return _AddDeferredGrads.apply(weight, pending)
    tokens = _full(weight.detach()).requires_grad_()
    tokens.register_hook(pending.append)  # returns None: the gradient itself is unchanged
    return tokens


class AlignerGate(nn.Module):
    """The per-head gate ``g`` of one layer, shape (1, heads, 1, 1), as a module so its key is ``<adapter>.weight``."""

    def __init__(self, num_heads: int, value: float, device: torch.device | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, num_heads, 1, 1), float(value), dtype=torch.float32, device=device))


class AlignerAttention(nn.Module, BaseTunerLayer):
    """Self-attention plus gated attention to the global Aligner tokens.

    The tokens of an adapter are stored once, in the ``aligner_tokens`` of its first adapted layer, and
    every adapted layer reads them through ``aligner_token_source`` (a plain dict, so the parameter is not
    registered twice and appears once in ``state_dict``, ``named_parameters`` and the saved adapter).
    Parameter names look like ``...self_attn.aligner_gate.<adapter>.weight``, the layout TRL's DPOTrainer
    relies on when it copies a trained ``default`` adapter into a frozen ``ref`` adapter.
    """

    adapter_layer_names = ("aligner_tokens", "aligner_gate")
    other_param_names = ("aligner_token_source",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, token_owner: AlignerAttention | None):
        super().__init__()
        spec = ATTENTION_SPECS.get(type(base_layer).__name__)
        if spec is None:
            raise TypeError(
                f"Aligner cannot wrap {type(base_layer).__name__}; supported attention classes: "
                f"{', '.join(ATTENTION_SPECS)}."
            )
        self.base_layer = base_layer
        self.aligner_tokens = nn.ModuleDict({})  # adapter -> nn.Embedding(N, d), only on the first adapted layer
        self.aligner_gate = nn.ModuleDict({})  # adapter -> AlignerGate
        self.aligner_token_source: dict[str, nn.ModuleDict] = {}  # adapter -> the owner's aligner_tokens
        self._spec = spec
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, token_owner)

    def update_layer(self, adapter_name: str, config, token_owner: AlignerAttention | None) -> None:
        """Add ``adapter_name``: a ``gate_init`` gate here (random around it with ``init_weights=False``), and the
        tokens here if this is the first layer."""
        attn = self.base_layer
        device = attn.k_proj.weight.device
        num_heads = attn.config.num_attention_heads
        hidden_size = attn.config.hidden_size
        self.aligner_gate[adapter_name] = gate = AlignerGate(num_heads, config.gate_init, device=device)
        if not getattr(config, "init_weights", True):  # PEFT's request for a non-identity start
            nn.init.normal_(gate.weight, mean=config.gate_init, std=1.0)
        if token_owner is None:
            tokens = nn.Embedding(config.num_tokens, hidden_size, device=device, dtype=torch.float32)
            nn.init.normal_(tokens.weight, mean=0.0, std=config.token_init_std)
            self.aligner_tokens[adapter_name] = tokens
            token_owner = self
        self.aligner_token_source[adapter_name] = token_owner.aligner_tokens
        if token_owner is not self:
            _register_zero3_external(self, token_owner.aligner_tokens[adapter_name].weight)
        self.set_adapter(self.active_adapters)

    @property
    def _modeling(self) -> ModuleType:
        """The wrapped attention's modeling module (RoPE, attention functions), looked up rather than stored: a module
        object in the instance would make the layer impossible to deepcopy or pickle (a frozen reference copy)."""
        return sys.modules[type(self.base_layer).__module__]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("Aligner adds attention to learned tokens; it cannot be merged into base weights.")

    def unmerge(self) -> None:
        raise NotImplementedError("Aligner adapters are never merged.")

    def __getattr__(self, name: str) -> Any:
        """Expose the wrapped attention's attributes (``layer_idx``, ``config``, ``head_dim``...) to callers."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def _active_aligner_adapters(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.aligner_gate]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cache is None and "past_key_values" in kwargs:  # the pre-5.40 keyword of the wrapped forward
            cache = kwargs.pop("past_key_values")
        adapters = self._active_aligner_adapters()
        if not adapters:
            return self.base_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
        attn = self.base_layer
        modeling = self._modeling
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)

        query_states = attn.q_proj(hidden_states).view(hidden_shape)
        key_states = attn.k_proj(hidden_states).view(hidden_shape)
        if self._spec.qk_norm:
            query_states, key_states = attn.q_norm(query_states), attn.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = modeling.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, attn.layer_idx, kwargs=kwargs)

        attention_interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            _compat.attn_implementation(attn.config), modeling.eager_attention_forward
        )
        if self._spec.sliding_window is not None:
            kwargs["sliding_window"] = self._spec.sliding_window(attn)
        attn_output, attn_weights = attention_interface(
            attn,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not attn.training else attn.attention_dropout,
            scaling=attn.scaling,
            **kwargs,
        )
        # attn_output: (B, T, heads, head_dim) for eager, sdpa and flash alike.
        for adapter in adapters:
            aligned = self.global_token_attention(query_states, hidden_states.dtype, adapter)
            attn_output = attn_output + aligned.transpose(1, 2).to(attn_output.dtype)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return attn.o_proj(attn_output), attn_weights

    def global_token_attention(
        self, query_states: torch.Tensor, input_dtype: torch.dtype, adapter: str
    ) -> torch.Tensor:
        """``g * softmax(q K_p^T * scaling) V_p`` of shape (B or 1, heads, T or 1, head_dim).

        ``query_states`` are (B, heads, T, head_dim) after RoPE. The prefix keys/values are computed once
        per forward from the global tokens (no norm, no RoPE, no mask: every position sees all N tokens).
        """
        attn = self.base_layer
        tokens = _shared_tokens(self.aligner_token_source[adapter][adapter], owner=adapter in self.aligner_tokens)
        prefix = tokens.to(device=query_states.device, dtype=input_dtype).unsqueeze(0)  # (1, N, d)
        num_tokens = prefix.shape[1]
        prefix_shape = (1, num_tokens, -1, attn.head_dim)
        values = attn.v_proj(prefix).view(prefix_shape).transpose(1, 2)
        values = _repeat_heads(values, attn.num_key_value_groups).to(query_states.dtype)
        if num_tokens == 1:
            # A softmax over a single key is exactly 1 (value and gradient), so the output is V_p itself.
            mixed = values
        else:
            keys = attn.k_proj(prefix).view(prefix_shape)
            if self._spec.qk_norm:
                keys = attn.k_norm(keys)
            keys = _repeat_heads(keys.transpose(1, 2), attn.num_key_value_groups).to(query_states.dtype)
            scores = torch.matmul(query_states, keys.transpose(2, 3)) * attn.scaling
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query_states.dtype)
            mixed = torch.matmul(probs, values)
        gate = self.aligner_gate[adapter].weight.to(device=query_states.device, dtype=query_states.dtype)
        return gate * mixed

    def __repr__(self) -> str:
        return "aligner." + super().__repr__()
