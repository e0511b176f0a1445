# Copyright 2023-present the HuggingFace Inc. team.
# Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# Modifications for hf-align: only AlignerConfig in the grid, tiny local models built from configs.
"""PEFT's decoder-model tuner grid with ``AlignerConfig`` added: Aligner behaves as PEFT's own tuners do.

Transcribed from huggingface/peft ``tests/test_decoder_models.py`` (``TestDecoderModels``) at commit
``5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40`` (2026-08-21, 0.20.1.dev0, the newest commit of the stored snapshot and
the closest to the installed peft 0.21.2), running PEFT's ``PeftCommonTester`` (``tests/peft_testing_common.py``,
transcribed from the same commit) unchanged, plus the four common tests PEFT's ``tests/test_custom_models.py`` adds
(adapter-name substrings, ``low_cpu_mem_usage``, several adapters loaded, deleting an unknown adapter). PEFT's tests download ``hf-internal-testing`` / ``trl-internal-testing``
tiny models; here the same architectures Aligner supports (Llama, Qwen2) are built from configs and saved locally.

Skipped, each with its reason: ``inject_adapter_in_model`` (refused by PEFT for tuners with shared state), merging (Aligner cannot be merged: its tokens are an extra attention, not a weight
delta; ``unload()`` drops it), ``safe_serialization=False`` saves (hf-align writes no pickle), and the tests that
apply to other tuners only (prompt learning, LoRA/IA³ weighted combinations, mixed adapter batches).
"""

from __future__ import annotations

import pytest
import torch
from peft_testing_common import PeftCommonTester
from transformers import AutoModelForCausalLM

from hf_align.peft_tuners import AlignerConfig


NO_MERGE = "Aligner cannot be merged into the base weights (an extra attention, not a weight delta): use unload()"
NO_INJECT = (
    "the test goes through inject_adapter_in_model, which PEFT itself refuses for a tuner with shared state (Aligner's "
    "global tokens are shared by every adapted layer): get_peft_model is the way in"
)
ALL_CONFIGS = [
    (AlignerConfig, {"task_type": "CAUSAL_LM", "start_layer": 0}),
    (AlignerConfig, {"task_type": "CAUSAL_LM", "num_tokens": 3, "start_layer": 0, "token_init_std": 0.5}),
]
MODEL_ARCHITECTURES = ["llama", "qwen2"]


def set_init_weights_false(config_cls, kwargs):
    """PEFT's ``tests/testing_utils.py`` helper, for the one config class here (PEFT's ``else`` branch)."""
    return {**kwargs, "init_weights": False}


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """architecture → folder of a tiny random model (2 layers, 4 heads, GQA) with the testbed tokenizer."""
    from hf_align.testbed import load_random_tiny, load_tokenizer

    folders = {}
    for architecture in MODEL_ARCHITECTURES:
        model = load_random_tiny(architecture, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
        folder = tmp_path_factory.mktemp(f"tiny-{architecture}")
        model.save_pretrained(folder)
        load_tokenizer().save_pretrained(folder)
        folders[architecture] = str(folder)
    return folders


@pytest.fixture(params=["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def model_id(request, local_models):
    return local_models[request.param]


@pytest.mark.parametrize("config_cls,config_kwargs", ALL_CONFIGS)
class TestDecoderModels(PeftCommonTester):
    transformers_class = AutoModelForCausalLM
    torch_device = "cpu"

    def prepare_inputs_for_testing(self):
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def test_attributes_parametrized(self, model_id, config_cls, config_kwargs):
        self._test_model_attr(model_id, config_cls, config_kwargs.copy())

    def test_adapter_name(self, model_id, config_cls, config_kwargs):
        self._test_adapter_name(model_id, config_cls, config_kwargs.copy())

    def test_prepare_for_training_parametrized(self, model_id, config_cls, config_kwargs):
        self._test_prepare_for_training(model_id, config_cls, config_kwargs.copy())

    def test_save_pretrained(self, model_id, config_cls, config_kwargs):
        config_kwargs = set_init_weights_false(config_cls, config_kwargs)
        self._test_save_pretrained(model_id, config_cls, config_kwargs.copy())

    @pytest.mark.skip(reason="safe_serialization=False writes a pickle; hf-align writes safetensors only")
    def test_save_pretrained_pickle(self, model_id, config_cls, config_kwargs):
        pass

    def test_save_pretrained_selected_adapters(self, model_id, config_cls, config_kwargs):
        config_kwargs = set_init_weights_false(config_cls, config_kwargs)
        self._test_save_pretrained_selected_adapters(model_id, config_cls, config_kwargs.copy())

    def test_from_pretrained_config_construction(self, model_id, config_cls, config_kwargs):
        self._test_from_pretrained_config_construction(model_id, config_cls, config_kwargs.copy())

    @pytest.mark.skip(reason=NO_MERGE)
    def test_merge_layers(self, model_id, config_cls, config_kwargs):
        pass

    @pytest.mark.skip(reason=NO_MERGE)
    def test_merge_layers_multi(self, model_id, config_cls, config_kwargs):
        pass

    @pytest.mark.skip(reason=NO_MERGE)
    def test_merge_layers_nan(self, model_id, config_cls, config_kwargs):
        pass

    @pytest.mark.skip(reason=NO_MERGE)
    def test_merge_layers_fp16(self, model_id, config_cls, config_kwargs):
        pass

    def test_generate(self, model_id, config_cls, config_kwargs):
        self._test_generate(model_id, config_cls, config_kwargs.copy())

    def test_generate_pos_args(self, model_id, config_cls, config_kwargs):
        self._test_generate_pos_args(model_id, config_cls, config_kwargs.copy(), raises_err=False)

    def test_generate_half_prec(self, model_id, config_cls, config_kwargs):
        self._test_generate_half_prec(model_id, config_cls, config_kwargs.copy())

    def test_training_decoders(self, model_id, config_cls, config_kwargs):
        self._test_training(model_id, config_cls, config_kwargs.copy())

    def test_training_decoders_layer_indexing(self, model_id, config_cls, config_kwargs):
        self._test_training_layer_indexing(model_id, config_cls, config_kwargs.copy())

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_training_decoders_gradient_checkpointing(self, model_id, config_cls, config_kwargs, use_reentrant):
        self._test_training_gradient_checkpointing(model_id, config_cls, config_kwargs.copy(), use_reentrant)

    def test_inference_safetensors(self, model_id, config_cls, config_kwargs):
        self._test_inference_safetensors(model_id, config_cls, config_kwargs.copy())

    def test_peft_model_device_map(self, model_id, config_cls, config_kwargs):
        self._test_peft_model_device_map(model_id, config_cls, config_kwargs.copy())

    def test_delete_adapter(self, model_id, config_cls, config_kwargs):
        self._test_delete_adapter(model_id, config_cls, config_kwargs.copy())

    def test_delete_inactive_adapter(self, model_id, config_cls, config_kwargs):
        self._test_delete_inactive_adapter(model_id, config_cls, config_kwargs.copy())

    def test_adding_multiple_adapters_with_bias_raises(self, model_id, config_cls, config_kwargs):
        self._test_adding_multiple_adapters_with_bias_raises(model_id, config_cls, config_kwargs.copy())

    def test_unload_adapter(self, model_id, config_cls, config_kwargs):
        config_kwargs = set_init_weights_false(config_cls, config_kwargs)
        self._test_unload_adapter(model_id, config_cls, config_kwargs.copy())

    def test_disable_adapter(self, model_id, config_cls, config_kwargs):
        config_kwargs = set_init_weights_false(config_cls, config_kwargs)
        self._test_disable_adapter(model_id, config_cls, config_kwargs.copy())

    def test_passing_input_embeds_works(self, model_id, config_cls, config_kwargs):
        self._test_passing_input_embeds_works("", model_id, config_cls, config_kwargs.copy())

    def test_get_base_model_state_dict(self, model_id, config_cls, config_kwargs):
        self._test_get_base_model_state_dict(model_id, config_cls, config_kwargs.copy())

    # from PEFT's tests/test_custom_models.py, which runs these common tests on every tuner

    def test_save_pretrained_adapter_name_substring(self, model_id, config_cls, config_kwargs):
        config_kwargs = set_init_weights_false(config_cls, config_kwargs)
        self._test_save_pretrained_adapter_name_substring(model_id, config_cls, config_kwargs.copy())

    @pytest.mark.skip(reason=NO_INJECT)
    def test_load_model_low_cpu_mem_usage(self, model_id, config_cls, config_kwargs):
        pass

    def test_load_multiple_adapters(self, model_id, config_cls, config_kwargs):
        self._test_load_multiple_adapters(model_id, config_cls, config_kwargs.copy())

    def test_delete_unknown_adapter_raises(self, model_id, config_cls, config_kwargs):
        self._test_delete_unknown_adapter_raises(model_id, config_cls, config_kwargs.copy())


# ------------------------------------------------------------------------------------------------------------------
# PEFT's init convention, against the base model itself


def test_init_weights_true_is_the_identity_and_false_is_not(local_models):
    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(local_models["llama"])
    inputs = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = base(inputs).logits
        identity = get_peft_model(base, AlignerConfig(start_layer=0, init_weights=True))
        torch.testing.assert_close(identity(inputs).logits, expected, atol=0, rtol=0)
        base = identity.unload()
        other = get_peft_model(base, AlignerConfig(start_layer=0, init_weights=False))
        assert not torch.allclose(other(inputs).logits, expected, atol=1e-4)
        gates = [p for n, p in other.named_parameters() if "aligner_gate" in n]
        assert gates and all(g.abs().sum() > 0 for g in gates)


def test_init_weights_must_be_a_bool():
    with pytest.raises(ValueError, match="init_weights must be True or False"):
        AlignerConfig(init_weights="gaussian")
