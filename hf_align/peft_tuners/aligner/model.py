"""``AlignerModel``: the PEFT tuner that wraps the self-attention of the adapted decoder layers."""

from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from hf_align.errors import UserError
from hf_align.peft_tuners.aligner.config import AlignerConfig
from hf_align.peft_tuners.aligner.layer import ATTENTION_SPECS, SUPPORTED_MODEL_TYPES, AlignerAttention
from hf_align.quantization import keep_4bit_trainable


def check_model_config(peft_config: AlignerConfig, model_config: dict, fallback_name: str = "?") -> None:
    """Refuse, by name, a model the adapter cannot wrap -- from its config alone, so the CLI can ask before the
    weights are loaded: an unsupported ``model_type``, or layers the config does not have."""
    model_type = model_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        architectures = model_config.get("architectures") or [fallback_name]
        raise UserError(
            f"Aligner does not support model_type {model_type!r} ({', '.join(architectures)}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    num_layers = model_config.get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise UserError(f"Aligner needs `num_hidden_layers` in the model config, got {num_layers!r}.")
    peft_config.adapted_layers(num_layers)  # validates start_layer / layers_to_transform against the model


class AlignerModel(BaseTuner):
    """Aligner (arXiv 2312.05503) as a PEFT tuner: ``peft.get_peft_model(model, AlignerConfig(...))``.

    Each adapted layer's ``self_attn`` is replaced by an :class:`AlignerAttention` that holds the
    layer's per-head gate; the N global tokens of an adapter live in its first adapted layer and are
    shared by reference (see ``AlignerAttention``). Everything else (trainability, ``set_adapter``,
    ``disable_adapter``, deletion, saving and loading) is PEFT's ``BaseTuner`` machinery.
    """

    prefix: str = "aligner_"
    tuner_layer_cls = AlignerAttention
    target_module_mapping = {model_type: ["self_attn"] for model_type in SUPPORTED_MODEL_TYPES}
    # the global tokens are shared between layers, so `inject_adapter_in_model` (which returns only the
    # wrapped model) is refused by PEFT; `get_peft_model` is the way in.
    uses_shared_state: bool = True

    def __init__(self, model, config, adapter_name, *args, **kwargs):
        super().__init__(model, config, adapter_name, *args, **kwargs)
        if hasattr(self.model, "add_model_tags"):  # PEFT copies the base model's tags into the adapter's card
            self.model.add_model_tags(["hf-align", "aligner"])

    def _prepare_adapter_config(self, peft_config: AlignerConfig, model_config: dict) -> AlignerConfig:
        check_model_config(peft_config, model_config, fallback_name=type(self.model).__name__)
        return peft_config

    def _check_target_module_exists(self, peft_config: AlignerConfig, key: str) -> bool:
        """Match ``<...>.layers.<i>.<target_modules>`` for every adapted layer index ``i``."""
        match = re.fullmatch(rf"(?:.*\.)?layers\.(\d+)\.{re.escape(peft_config.target_modules)}", key)
        if match is None:
            return False
        num_layers = self.model.config.num_hidden_layers
        return int(match.group(1)) in peft_config.adapted_layers(num_layers)

    def _token_owner(self, adapter_name: str) -> AlignerAttention | None:
        """The layer holding ``adapter_name``'s global tokens, or None before its first layer is wrapped."""
        for module in self.model.modules():
            if isinstance(module, AlignerAttention) and adapter_name in module.aligner_tokens:
                return module
        return None

    def _create_and_replace(
        self,
        peft_config: AlignerConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        owner = self._token_owner(adapter_name)
        if isinstance(target, AlignerAttention):
            target.update_layer(adapter_name, peft_config, owner)
            return
        if type(target).__name__ not in ATTENTION_SPECS:
            raise TypeError(
                f"Aligner cannot wrap {current_key} ({type(target).__name__}); supported attention classes: "
                f"{', '.join(ATTENTION_SPECS)}."
            )
        new_module = AlignerAttention(target, adapter_name, peft_config, owner)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not automatically trainable
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not isinstance(new_module, AlignerAttention):  # `unload()` puts the original attention module back
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's deletion, plus: adapters may cover different layers, so the first wrapped layer can end up with
        no adapter left and PEFT would report none active; fall back to the first remaining adapter like its layers.
        """
        super().delete_adapter(adapter_name)
        if not self.active_adapters and self.peft_config:
            self.set_adapter(sorted(self.peft_config)[0])

    _kept_4bit_trainable = False

    def forward(self, *args, **kwargs):
        # A 4-bit base repacked for CPU inference would cut the adapter's gradients. The first forward that records
        # gradients restores it and turns the repacking off for good, so later forwards need not walk the model.
        if torch.is_grad_enabled() and not self._kept_4bit_trainable:
            keep_4bit_trainable(self.model)
            self._kept_4bit_trainable = True
        return super().forward(*args, **kwargs)

    def _check_merge_allowed(self):
        raise ValueError("Aligner cannot be merged into the base weights; use `unload()` to drop it.")
