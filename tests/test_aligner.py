"""Aligner as a PEFT tuner: mechanism against the paper's formula, PEFT integration, generation, quantisation."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file

import hf_align  # noqa: F401  (registration)
from hf_align.peft_tuners import AlignerConfig
from hf_align.peft_tuners.aligner import AlignerAttention, AlignerModel
from hf_align.peft_tuners.aligner.config import ensure_peft_type_member
from hf_align.testbed import load_random_tiny


ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _batch(tokenizer, side="left"):
    tokenizer.padding_side = side
    try:
        return tokenizer(["12+34=", "rev 3814=", "7*8="], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = "right"


def _perturb_gates(model, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "aligner_gate" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_peft_type_member():
    member = ensure_peft_type_member()
    assert member is PeftType.ALIGNER is PeftType("ALIGNER") is PeftType["ALIGNER"]
    assert member.value == "ALIGNER" and isinstance(member, PeftType) and member in list(PeftType)
    assert ensure_peft_type_member() is member  # idempotent
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[member] is AlignerModel
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[member] is AlignerConfig
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[member] == "aligner_"
    config = AlignerConfig()
    assert config.peft_type is member and config.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch, attn_implementation, tokenizer):
    model = load_random_tiny(arch, attn_implementation=attn_implementation)
    batch = _batch(tokenizer)
    assert (batch["attention_mask"] == 0).any()  # really padded
    expected = _logits(model, batch)
    peft_model = get_peft_model(model, AlignerConfig(num_tokens=3))
    assert isinstance(peft_model.base_model.model.model.layers[2].self_attn, AlignerAttention)
    torch.testing.assert_close(_logits(peft_model, batch), expected, atol=1e-6, rtol=0)
    _perturb_gates(peft_model)
    assert (_logits(peft_model, batch) - expected).abs().max() > 1e-3  # the gate is what made it equal


def _reference_attention_delta(layer, hidden, position_embeddings, tokens, gate, modeling):
    """The paper's extra term, written out: o_proj(g * softmax(q K_p^T / sqrt(hd)) V_p) (o_proj has no bias)."""
    attn = layer.base_layer
    batch, length, _ = hidden.shape
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    groups = heads // attn.config.num_key_value_heads
    query = attn.q_proj(hidden).view(batch, length, heads, head_dim)
    keys = attn.k_proj(tokens).view(len(tokens), -1, head_dim)
    if hasattr(attn, "q_norm"):
        query, keys = attn.q_norm(query), attn.k_norm(keys)
    query, _ = modeling.apply_rotary_pos_emb(query.transpose(1, 2), query.transpose(1, 2), *position_embeddings)
    values = attn.v_proj(tokens).view(len(tokens), -1, head_dim)
    kv_head = torch.arange(heads) // groups
    keys, values = keys[:, kv_head], values[:, kv_head]  # (N, heads, hd)
    scores = torch.einsum("bhtd,nhd->bhtn", query, keys) / head_dim**0.5
    mixed = torch.einsum("bhtn,nhd->bhtd", scores.softmax(-1), values) * gate.view(1, heads, 1, 1)
    assert attn.o_proj.bias is None
    return attn.o_proj(mixed.transpose(1, 2).reshape(batch, length, heads * head_dim))


@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_attention_term_matches_formula(arch, num_tokens):
    model = get_peft_model(load_random_tiny(arch), AlignerConfig(num_tokens=num_tokens))
    _perturb_gates(model)
    inner = model.base_model.model.model
    layer = inner.layers[3].self_attn
    modeling = sys.modules[type(layer.base_layer).__module__]
    hidden = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(5).expand(2, 5)
    position_embeddings = inner.rotary_emb(hidden, position_ids)
    tokens = inner.layers[2].self_attn.aligner_tokens["default"].weight  # stored once, on the first adapted layer
    gate = layer.aligner_gate["default"].weight
    with torch.no_grad():
        adapted, _ = layer(hidden, position_embeddings=position_embeddings, attention_mask=None)
        base, _ = layer.base_layer(hidden, position_embeddings=position_embeddings, attention_mask=None)
        delta = _reference_attention_delta(layer, hidden, position_embeddings, tokens, gate, modeling)
    torch.testing.assert_close(adapted, base + delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "num_adapted"),
    [({}, 2), ({"start_layer": 0, "num_tokens": 5}, 4), ({"layers_to_transform": [1, 3]}, 2)],
)
def test_trainable_parameter_count_is_the_formula(kwargs, num_adapted):
    model = load_random_tiny("qwen2")
    config = AlignerConfig(**kwargs)
    peft_model = get_peft_model(model, config)
    d, heads, layers = model.config.hidden_size, model.config.num_attention_heads, model.config.num_hidden_layers
    expected = config.num_tokens * d + num_adapted * heads
    assert peft_model.get_nb_trainable_parameters()[0] == expected
    assert config.num_trainable_parameters(d, heads, layers) == expected
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert trainable and all(".aligner_tokens." in name or ".aligner_gate." in name for name in trainable)
    assert sum(".aligner_tokens." in name for name in trainable) == 1  # one global token set


def test_bad_layer_config_errors():
    with pytest.raises(ValueError, match="start_layer=4 but the model has only 4 layers"):
        get_peft_model(load_random_tiny("llama"), AlignerConfig(start_layer=4))
    with pytest.raises(ValueError, match=r"layers_to_transform has indices \[7\]"):
        get_peft_model(load_random_tiny("llama"), AlignerConfig(layers_to_transform=[1, 7]))
    with pytest.raises(ValueError, match="num_tokens"):
        AlignerConfig(num_tokens=0)


def test_unsupported_architecture_error_names_it_and_the_supported_ones():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"'gpt2' \(GPT2LMHeadModel\).*llama, mistral, qwen2, qwen3"):
        get_peft_model(gpt2, AlignerConfig())
    assert not any("Aligner" in type(m).__name__ for m in gpt2.modules())  # nothing half-applied


def test_gradients_reach_only_aligner_parameters(tokenizer):
    model = get_peft_model(load_random_tiny("llama"), AlignerConfig(num_tokens=2))
    _perturb_gates(model)
    batch = _batch(tokenizer)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == {name for name, param in model.named_parameters() if param.requires_grad}
    assert all("aligner_" in name for name in with_grad) and len(with_grad) == 3  # tokens + 2 gates
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)


def test_save_load_reproduces_logits_and_records_peft_type(tmp_path, tokenizer):
    model = get_peft_model(load_random_tiny("qwen3"), AlignerConfig(num_tokens=2, start_layer=1))
    _perturb_gates(model)
    batch = _batch(tokenizer)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ALIGNER" and saved["num_tokens"] == 2 and saved["start_layer"] == 1
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k.rsplit(".", 2)[-2] for k in weights) == ["aligner_gate"] * 3 + ["aligner_tokens"]

    loaded = PeftModel.from_pretrained(load_random_tiny("qwen3"), tmp_path)
    assert isinstance(loaded.base_model, AlignerModel) and isinstance(loaded.peft_config["default"], AlignerConfig)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=0, rtol=0)


def test_fresh_process_loads_adapter_after_import_hf_align(tmp_path):
    """`import hf_align` registers Aligner lazily: PEFT loads the saved config without touching hf_align again."""
    get_peft_model(load_random_tiny("llama"), AlignerConfig(num_tokens=4)).save_pretrained(tmp_path)
    code = (
        "import sys, hf_align; assert 'peft' not in sys.modules, 'import hf_align must stay cheap';"
        "from peft import PeftConfig; c = PeftConfig.from_pretrained(sys.argv[1]);"
        "print(type(c).__name__, c.peft_type.value, c.num_tokens)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["AlignerConfig", "ALIGNER", "4"]


def test_push_to_hub_uploads_the_saved_adapter(tmp_path, monkeypatch):
    """push_to_hub goes through save_pretrained; capture the commit instead of talking to the Hub."""
    import huggingface_hub

    model = get_peft_model(load_random_tiny("llama"), AlignerConfig())
    uploaded = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            uploaded[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message="",
            commit_description="",
            oid="0" * 40,
        )

    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"),
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    model.push_to_hub("someone/aligner-test", token="hf_dummy")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploaded)
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "ALIGNER"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_generation_same_with_and_without_kv_cache(arch, tokenizer):
    model = get_peft_model(load_random_tiny(arch), AlignerConfig(num_tokens=3))
    _perturb_gates(model, scale=3.0)
    batch = _batch(tokenizer)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
        with model.disable_adapter():
            base = model.generate(**batch, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the adapter does change the generations


def test_disable_adapter_restores_base(tokenizer):
    model = load_random_tiny("mistral")
    batch = _batch(tokenizer)
    expected = _logits(model, batch)
    peft_model = get_peft_model(model, AlignerConfig())
    _perturb_gates(peft_model)
    adapted = _logits(peft_model, batch)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model, batch), expected, atol=0, rtol=0)
    torch.testing.assert_close(_logits(peft_model, batch), adapted, atol=0, rtol=0)
    assert (adapted - expected).abs().max() > 1e-3


def test_deepcopy_is_an_equal_independent_model(tokenizer):
    """A frozen reference is often a deepcopy of the policy (trl.create_reference_model, the fidelity benchmark's
    DPO): the copy gives the same logits, and every adapted layer of the copy reads the copy's own global tokens."""
    model = get_peft_model(load_random_tiny("llama"), AlignerConfig(num_tokens=2))
    _perturb_gates(model)
    batch = _batch(tokenizer)
    expected = _logits(model, batch)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(_logits(clone, batch), expected, atol=0, rtol=0)
    layers = [m for m in clone.modules() if isinstance(m, AlignerAttention)]
    tokens = layers[0].aligner_tokens
    assert len(layers) == 2 and all(layer.aligner_token_source["default"] is tokens for layer in layers)
    with torch.no_grad():
        tokens["default"].weight.add_(1.0)
    torch.testing.assert_close(_logits(model, batch), expected, atol=0, rtol=0)
    assert (_logits(clone, batch) - expected).abs().max() > 1e-3


def test_two_named_adapters_set_adapter_and_roundtrip(tmp_path, tokenizer):
    batch = _batch(tokenizer)
    model = get_peft_model(load_random_tiny("llama"), AlignerConfig(num_tokens=1))
    model.add_adapter("other", AlignerConfig(num_tokens=2, start_layer=1))
    _perturb_gates(model)
    assert model.active_adapter == "default"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    first = _logits(model, batch)
    model.set_adapter("other")
    assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_nb_trainable_parameters()[0] == 2 * 64 + 3 * 4
    second = _logits(model, batch)
    assert (first - second).abs().max() > 1e-3

    model.save_pretrained(tmp_path)  # writes default/ and other/
    loaded = PeftModel.from_pretrained(load_random_tiny("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(_logits(loaded, batch), first, atol=0, rtol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(_logits(loaded, batch), second, atol=0, rtol=0)

    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(_logits(model, batch), first, atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    batch = _batch(tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(load_random_tiny("qwen2"), AlignerConfig(num_tokens=2))
        _perturb_gates(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_bf16_base_identity_and_fp32_adapter(tokenizer):
    model = load_random_tiny("qwen3").to(torch.bfloat16)
    batch = _batch(tokenizer)
    expected = _logits(model, batch)
    peft_model = get_peft_model(model, AlignerConfig(num_tokens=2))
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if "aligner_" in n)
    torch.testing.assert_close(_logits(peft_model, batch), expected, atol=0, rtol=0)
    _perturb_gates(peft_model)
    out = peft_model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_4bit_bitsandbytes_base(tmp_path, tokenizer):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    load_random_tiny("llama").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    assert isinstance(model.model.layers[2].self_attn.k_proj, bnb.nn.Linear4bit)
    batch = _batch(tokenizer)
    expected = _logits(model, batch)
    peft_model = get_peft_model(model, AlignerConfig(num_tokens=2))
    torch.testing.assert_close(_logits(peft_model, batch), expected, atol=1e-6, rtol=0)
    _perturb_gates(peft_model)
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    assert {n for n, p in peft_model.named_parameters() if p.grad is not None} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }


def test_unload_restores_plain_attention_and_merge_is_refused(tokenizer):
    model = load_random_tiny("llama")
    batch = _batch(tokenizer)
    expected = _logits(model, batch)
    peft_model = get_peft_model(model, AlignerConfig())
    _perturb_gates(peft_model)
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()
    base = peft_model.unload()
    assert not any(isinstance(m, AlignerAttention) for m in base.modules())
    torch.testing.assert_close(_logits(base, batch), expected, atol=0, rtol=0)


def test_a_saved_adapter_says_where_users_meet_it_that_it_needs_hf_align(tmp_path):
    """PEFT has no plugin hook: without `import hf_align` loading fails with KeyError 'ALIGNER'. The saved
    adapter_config.json and the card's tags say what is needed; with the import it loads."""
    model = get_peft_model(load_random_tiny("llama", hidden_size=32, num_layers=4), AlignerConfig(num_tokens=1))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "import hf_align" in config["requires"] and "KeyError: 'ALIGNER'" in config["requires"]
    card = yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])
    assert {"hf-align", "aligner"} <= set(card["tags"])
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    without = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert without.returncode != 0 and "KeyError: 'ALIGNER'" in without.stderr
    with_import = subprocess.run([sys.executable, "-c", "import hf_align; " + script], capture_output=True, text=True)
    assert with_import.returncode == 0, with_import.stderr


def test_aligner_cli_refuses_an_unsupported_architecture_before_loading_weights(tmp_path, capsys):
    """The folder holds only a GPT-2 config.json: were weights loaded first, the error would be a missing file."""
    from transformers import GPT2Config

    from hf_align.cli import main

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    argv = ["aligner-sft", "--model_name_or_path", str(tmp_path / "gpt2"), "--dataset_name", "testbed:sft"]
    argv += ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none", "--max_steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Aligner does not support model_type 'gpt2'" in err and "supported model types: llama" in err
    assert not (tmp_path / "out").exists()
