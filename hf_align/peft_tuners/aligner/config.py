"""``AlignerConfig``: the PEFT config of Aligner (arXiv 2312.05503), plus the one adaptation of PEFT internals."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType, TaskType


ALIGNER_PEFT_TYPE_NAME = "ALIGNER"
REQUIRES = "pip install hf-align; `import hf_align` before `PeftModel.from_pretrained` (else KeyError: 'ALIGNER')"


def ensure_peft_type_member(name: str = ALIGNER_PEFT_TYPE_NAME) -> PeftType:
    """Return ``PeftType[name]``, adding the member to PEFT's closed enum first if it is missing.

    PEFT 0.21's ``register_peft_method`` only accepts names that are members of ``PeftType`` and the
    library reads ``config.peft_type.value`` in several places, so a plain string will not do. Python
    3.11 enums have no public way to add a member: :func:`hf_align._compat.add_enum_member` does it (tested in
    ``tests/test_aligner.py::test_peft_type_member`` and ``tests/test_compat.py``). A PEFT that ships its own
    member of that name is used as is.
    """
    from hf_align._compat import add_enum_member

    return add_enum_member(PeftType, name)


ensure_peft_type_member()


@dataclass
class AlignerConfig(PeftConfig):
    """Configuration of an Aligner adapter: N global tokens shared by every adapted layer, one gate per head.

    In every adapted layer the global tokens pass, without normalisation and without RoPE, through that
    layer's own ``k_proj``/``v_proj``; the (rotary-embedded) queries attend to them in a separate,
    non-causal softmax, and the result, times a per-head gate ``g`` of shape ``(1, heads, 1, 1)``
    (zero-initialised, no tanh), is added to the ordinary attention output before ``o_proj``:
    ``y = o_proj(attn(q, K, V) + g * softmax(q K_p^T * scaling) V_p)``.

    Trainable parameters: ``N * d + (L - start_layer) * H`` with ``N = num_tokens``, ``d`` the hidden
    size, ``L`` the number of layers and ``H`` the number of attention heads (``len(layers_to_transform) * H``
    when an explicit layer list is given). With ``gate_init=0`` and ``init_weights=True`` (the defaults) the
    adapted model equals the base model.

    Example::

        from hf_align.peft_tuners import AlignerConfig
        from peft import get_peft_model

        model = get_peft_model(base_model, AlignerConfig(num_tokens=1))
    """

    num_tokens: int = field(default=1, metadata={"help": "Number N of global tokens shared by all adapted layers."})
    start_layer: int = field(
        default=2,
        metadata={"help": "Adapt the attention of every layer with index >= start_layer (2 in all published runs)."},
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit list of layer indices to adapt; overrides `start_layer` when given."},
    )
    gate_init: float = field(
        default=0.0,
        metadata={"help": "Initial value of every per-head gate; 0 makes the adapted model equal the base model."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "PEFT's common init switch: True starts every gate at `gate_init` (0 by default: the adapted "
            "model equals the base model); False draws each gate from N(gate_init, 1), a non-identity start, as "
            "PEFT's own tests request it of every tuner."
        },
    )
    token_init_std: float = field(
        default=1.0,
        metadata={
            "help": "Std of the normal init of the global tokens; 1 matches the RMS-normalised hidden states the "
            "k/v projections normally see (the tokens bypass the layer norm)."
        },
    )
    requires: str = field(
        default=REQUIRES,
        metadata={
            "help": "What loading this adapter needs, written into adapter_config.json for whoever opens it: PEFT has "
            "no plugin hook, so `PeftModel.from_pretrained` without `import hf_align` fails with KeyError: 'ALIGNER'."
        },
    )
    target_modules: str = field(
        default="self_attn",
        metadata={"help": "Attribute name of the attention module inside each decoder layer (the module wrapped)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[ALIGNER_PEFT_TYPE_NAME]
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"AlignerConfig.num_tokens must be a positive integer, got {self.num_tokens!r}.")
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"AlignerConfig.start_layer must be a non-negative integer, got {self.start_layer!r}.")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if isinstance(layers, int):
                layers = [layers]
            if not layers or any(not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(
                    "AlignerConfig.layers_to_transform must be a non-empty list of non-negative layer indices, "
                    f"got {self.layers_to_transform!r}."
                )
            self.layers_to_transform = sorted(set(layers))
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"AlignerConfig.init_weights must be True or False, got {self.init_weights!r}.")
        if self.token_init_std < 0:
            raise ValueError(f"AlignerConfig.token_init_std must be >= 0, got {self.token_init_std!r}.")

    def adapted_layers(self, num_layers: int) -> list[int]:
        """The layer indices this config adapts in a model with ``num_layers`` decoder layers (validated)."""
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if i >= num_layers]
            if bad:
                raise ValueError(
                    f"AlignerConfig.layers_to_transform has indices {bad} but the model has only {num_layers} layers."
                )
            return list(self.layers_to_transform)
        if self.start_layer >= num_layers:
            raise ValueError(
                f"AlignerConfig.start_layer={self.start_layer} but the model has only {num_layers} layers "
                f"(valid: 0..{num_layers - 1})."
            )
        return list(range(self.start_layer, num_layers))

    def num_trainable_parameters(self, hidden_size: int, num_heads: int, num_layers: int) -> int:
        """``N * d + (number of adapted layers) * H``: the formula from the paper."""
        return self.num_tokens * hidden_size + len(self.adapted_layers(num_layers)) * num_heads
