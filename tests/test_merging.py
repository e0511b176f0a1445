"""Linear/partwise streaming merges vs θ = α·θ_base + (1−α)·θ_aligned written out by hand."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_align.merging import MergePlan, linear_plan, merge_models, partwise_plan, streaming
from hf_align.merging.plan import parse_alphas, parse_pivots


def _save(model, path, shard="40KB"):
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two random tiny Llamas (6 layers) saved in several shards: base and 'aligned'."""
    from hf_align.testbed import load_random_tiny, load_tokenizer

    root = tmp_path_factory.mktemp("pair")
    kwargs = dict(hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=64)
    base = _save(load_random_tiny("llama", seed=0, **kwargs), root / "base")
    aligned = _save(load_random_tiny("llama", seed=1, **kwargs), root / "aligned")
    load_tokenizer().save_pretrained(aligned)
    assert len(list(base.glob("*.safetensors"))) > 2
    return base, aligned


def _state(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_formula(out, base, aligned, alpha_of):
    merged, b, a = _state(out), _state(base), _state(aligned)
    assert set(merged) == set(a)
    for name, tensor in merged.items():
        alpha = alpha_of(name)
        expected = alpha * b[name].double() + (1 - alpha) * a[name].double()
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)


def test_linear_merge_equals_formula_and_is_sharded(pair, tmp_path):
    base, aligned = pair
    result = merge_models(base, aligned, tmp_path / "out", alpha=0.3, max_shard_size="30KB", progress=False)
    out = tmp_path / "out"
    _assert_formula(out, base, aligned, lambda name: 0.3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert result.num_shards == len(set(index["weight_map"].values())) > 2
    assert set(index["weight_map"]) == set(_state(aligned))
    for file in set(index["weight_map"].values()):
        with safe_open(out / file, "pt") as handle:  # standard safetensors, readable by the reference reader
            assert handle.metadata() == {"format": "pt"}
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert (out / "generation_config.json").exists()
    assert json.loads((out / "merge_plan.json").read_text())["alphas"]["model.norm.weight"] == 0.3


def _expected_partwise_alpha(name):
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return 0.4 if layer <= 1 else 0.3 if layer <= 3 else 0.2
    if name == "model.embed_tokens.weight":
        return 0.7
    assert name in ("lm_head.weight", "model.norm.weight"), name
    return 0.9


def test_partwise_merge_equals_formula(pair, tmp_path):
    base, aligned = pair

    def build(names, config):
        return partwise_plan(names, "1#3", "0.4|0.3|0.2", embed_alpha=0.7, head_alpha=0.9)

    merge_models(base, aligned, tmp_path / "out", plan=build, progress=False)
    _assert_formula(tmp_path / "out", base, aligned, _expected_partwise_alpha)
    assert (tmp_path / "out" / "model.safetensors").exists()  # small enough for one 500MB shard: no index


@pytest.mark.parametrize("alpha, side", [(0.0, "aligned"), (1.0, "base")])
def test_alpha_zero_and_one_reproduce_the_inputs_exactly(pair, tmp_path, alpha, side):
    base, aligned = pair
    merge_models(base, aligned, tmp_path / "out", alpha=alpha, progress=False)
    expected = _state(base if side == "base" else aligned)
    merged = _state(tmp_path / "out")
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[n], expected[n]) for n in expected)


def test_bf16_output_dtype_and_mixed_input_dtypes(pair, tmp_path):
    base, aligned = pair
    merge_models(base, aligned, tmp_path / "bf16", alpha=0.5, dtype="bfloat16", progress=False)
    merged = _state(tmp_path / "bf16")
    b, a = _state(base), _state(aligned)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        exact = 0.5 * b[name].double() + 0.5 * a[name].double()
        torch.testing.assert_close(tensor.double(), exact, rtol=2**-8, atol=1e-8, msg=name)  # one bf16 rounding
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # base in bf16, aligned in fp32 (a model trained in float32): computed in fp32, output in the base's dtype,
    # rounded once (issue #29.3: was float32, twice the base's size), and config.json says so
    merge_models(tmp_path / "bf16", aligned, tmp_path / "mixed", alpha=0.25, progress=False)
    mixed = _state(tmp_path / "mixed")
    for name, tensor in mixed.items():
        assert tensor.dtype == torch.bfloat16
        expected = 0.25 * merged[name].double() + 0.75 * a[name].double()
        torch.testing.assert_close(tensor.double(), expected, rtol=2**-8, atol=1e-8, msg=name)
    assert json.loads((tmp_path / "mixed" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_merge_takes_use_cache_from_the_base(pair, tmp_path):
    """An aligned model saved while training (``use_cache: false``) does not pass that on to the merge (#29.3)."""
    import shutil

    base, aligned = pair
    trained = tmp_path / "trained"
    shutil.copytree(aligned, trained)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    merge_models(base, trained, tmp_path / "out", alpha=0.5, progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True


@pytest.fixture(scope="module")
def bf16_pair(pair, tmp_path_factory):
    """The pair stored in bfloat16 (one shard each): every stored value is bf16-representable."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16_pair")
    for side in pair:
        AutoModelForCausalLM.from_pretrained(side, dtype=torch.bfloat16).save_pretrained(root / side.name)
    return root / "base", root / "aligned"


def test_float32_output_of_bf16_inputs_is_a_genuine_float32_merge(bf16_pair, tmp_path):
    """Issue #20: ``--dtype float32`` on bf16 inputs was a bf16 merge cast up (every value bf16-representable)."""
    base, aligned = bf16_pair
    alpha = 0.3
    merge_models(base, aligned, tmp_path / "fp32", alpha=alpha, dtype="float32", progress=False)
    merged, b, a = _state(tmp_path / "fp32"), _state(base), _state(aligned)
    not_bf16 = total = 0
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32 and b[name].dtype == torch.bfloat16
        # θ = α·θ_base + (1−α)·θ_aligned in float64, rounded once to float32
        reference = alpha * b[name].double() + (1 - alpha) * a[name].double()
        error = (tensor.double() - reference.float().double()).abs()
        # one float32 rounding of the result and one of α·(θ_base − θ_aligned) at most (lerp's two steps)
        bound = 2**-23 * (reference.abs() + b[name].double().abs() + a[name].double().abs())
        assert bool((error <= bound).all()), name
        not_bf16 += int((tensor.bfloat16().float() != tensor).sum())
        total += tensor.numel()
    assert not_bf16 / total > 0.5  # a genuine float32 merge, not bf16 values cast up

    merge_models(base, aligned, tmp_path / "fp16", alpha=alpha, dtype="float16", progress=False)
    for name, tensor in _state(tmp_path / "fp16").items():  # bf16 → fp16: rounded once (fp32 compute), not twice
        reference = alpha * b[name].double() + (1 - alpha) * a[name].double()
        torch.testing.assert_close(tensor.double(), reference, rtol=2**-11, atol=2**-24, msg=name)


def test_single_file_is_preferred_over_an_index_like_from_pretrained(pair, tmp_path):
    """With both ``model.safetensors`` and ``model.safetensors.index.json``, transformers reads the single file."""
    import shutil

    from transformers import AutoModelForCausalLM

    base, aligned = pair
    both = tmp_path / "both"
    shutil.copytree(aligned, both)  # the index and its shards hold the aligned weights ...
    save_file(_state(base), both / "model.safetensors", metadata={"format": "pt"})  # ... model.safetensors the base's
    assert (both / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(both).state_dict()
    expected = _state(base)
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)  # what transformers reads

    with streaming.Checkpoint(both) as ckpt:
        assert {info.file.name for info in ckpt.tensors.values()} == {"model.safetensors"}
    merge_models(aligned, both, tmp_path / "out", alpha=0.0, progress=False)  # α = 0: exactly the 'aligned' side
    merged = _state(tmp_path / "out")
    assert all(torch.equal(merged[n], expected[n]) for n in expected)


def test_merged_checkpoint_loads_with_auto_model(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, aligned = pair
    merge_models(base, aligned, tmp_path / "out", alpha=0.2, max_shard_size="30KB", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    b, a = _state(base), _state(aligned)
    for name, param in model.state_dict().items():
        torch.testing.assert_close(param, 0.2 * b[name] + 0.8 * a[name], rtol=0, atol=1e-6)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_interrupted_merge_leaves_no_output_dir(pair, tmp_path, monkeypatch):
    base, aligned = pair
    calls = {"n": 0}
    original = streaming.ShardWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed mid-merge")
        original(self, name, tensor)

    monkeypatch.setattr(streaming.ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        merge_models(base, aligned, tmp_path / "out", alpha=0.5, max_shard_size="30KB", progress=False)
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def _names(architecture, **kwargs):
    from hf_align.testbed import load_random_tiny

    model = load_random_tiny(architecture, hidden_size=32, num_layers=6, **kwargs)
    return list(model.state_dict()), model.config


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_partwise_plan_assigns_alpha_to_every_tensor(architecture):
    names, config = _names(architecture)
    if architecture == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    plan = partwise_plan(names, [1, 3], [0.4, 0.3, 0.2], embed_alpha=0.7, head_alpha=0.9)
    assert set(plan.alphas) == set(names)
    for name in names:
        assert plan[name] == _expected_partwise_alpha(name), name
    # inclusive pivots, default embed/head α: first and last part
    plan = partwise_plan(names, "1#3", "0.4|0.3|0.2")
    assert plan["model.layers.1.input_layernorm.weight"] == 0.4
    assert plan["model.layers.2.mlp.down_proj.weight"] == 0.3
    assert plan["model.layers.4.post_attention_layernorm.weight"] == 0.2
    assert plan["model.embed_tokens.weight"] == 0.4 and plan["lm_head.weight"] == 0.2
    assert plan["model.norm.weight"] == 0.2
    table = str(plan)
    assert "layers 0–1" in table and "layers 2–3" in table and "layers 4–5" in table


def test_partwise_plan_with_tied_embeddings():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]
    plan = partwise_plan(names, [], [0.3], embed_alpha=0.6, head_alpha=0.1, tie_word_embeddings=True)
    assert plan["lm_head.weight"] == 0.6 and plan["model.norm.weight"] == 0.1


def test_tied_qwen2_merge_end_to_end(tmp_path):
    """Tied embeddings: only the embedding is stored; the merged model loads with the head tied to it."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(_save(Qwen2ForCausalLM(config), tmp_path / f"m{seed}"))

    def build(names, cfg):
        assert cfg["tie_word_embeddings"] and "lm_head.weight" not in names
        return partwise_plan(names, "1", "0.5|0.1", embed_alpha=0.8, head_alpha=0.2, tie_word_embeddings=True)

    merge_models(paths[0], paths[1], tmp_path / "out", plan=build, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    b, a = _state(paths[0]), _state(paths[1])
    expected = 0.8 * b["model.embed_tokens.weight"] + 0.2 * a["model.embed_tokens.weight"]
    torch.testing.assert_close(model.lm_head.weight, expected, rtol=0, atol=1e-6)
    plan = MergePlan.load(tmp_path / "out")
    assert plan["model.norm.weight"] == 0.2 and plan["model.layers.1.self_attn.q_proj.bias"] == 0.5
    assert plan["model.layers.2.self_attn.q_proj.bias"] == 0.1


def test_plan_parsing_and_validation(tmp_path):
    assert parse_pivots("10#20") == parse_pivots("[10, 20]") == parse_pivots([10, 20]) == [10, 20]
    assert parse_alphas("0.4|0.3|0.2") == parse_alphas("0.4,0.3,0.2") == [0.4, 0.3, 0.2]
    with pytest.raises(ValueError, match="strictly increasing"):
        parse_pivots("20#10")
    with pytest.raises(ValueError, match=r"alphas\[1\] must be in \[0, 1\]"):
        parse_alphas("0.4|1.3")
    names, _ = _names("llama")
    with pytest.raises(ValueError, match="one α per part"):
        partwise_plan(names, "1#3", "0.4|0.3")
    with pytest.raises(ValueError, match="last part empty"):
        partwise_plan(names, "1#5", "0.4|0.3|0.2")
    with pytest.raises(ValueError, match="No partwise rule.*rotary"):
        partwise_plan([*names, "model.rotary.inv_freq"], "1", "0.4|0.3")
    plan = linear_plan(names, 0.25)
    loaded = MergePlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.alphas == plan.alphas


def _expect_no_write(tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        merge_models(output_dir=out, progress=False, **kwargs)
    assert not out.exists()


def test_bad_inputs_fail_before_anything_is_written(pair, tmp_path):
    from hf_align.testbed import load_random_tiny

    base, aligned = pair
    _expect_no_write(tmp_path, r"alpha must be in \[0, 1\]", base=base, aligned=aligned, alpha=1.5)
    qwen = _save(load_random_tiny("qwen2", hidden_size=32, num_layers=6), tmp_path / "qwen")
    _expect_no_write(tmp_path, "model_type 'llama'.*'qwen2'", base=base, aligned=qwen, alpha=0.5)
    wide = _save(load_random_tiny("llama", hidden_size=64, num_layers=6), tmp_path / "wide")
    _expect_no_write(tmp_path, "shapes differ", base=base, aligned=wide, alpha=0.5)
    shallow = _save(
        load_random_tiny("llama", hidden_size=32, num_layers=6, num_heads=4, intermediate_size=64), tmp_path / "s"
    )
    state = _state(shallow)
    del state["model.layers.5.mlp.up_proj.weight"]
    for file in shallow.glob("model*.safetensors*"):
        file.unlink()
    save_file(state, shallow / "model.safetensors", metadata={"format": "pt"})
    _expect_no_write(
        tmp_path, r"missing in aligned .*model\.layers\.5\.mlp\.up_proj", base=base, aligned=shallow, alpha=0.5
    )
    with pytest.raises(FileExistsError):
        merge_models(base, aligned, tmp_path / "qwen", alpha=0.5, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_models(base, tmp_path / "nope", tmp_path / "out", alpha=0.5, progress=False)


def test_peft_adapter_is_merged_first(pair, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, aligned = pair
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_adapter = peft_model.merge_and_unload().state_dict()
    merge_models(base, tmp_path / "adapter", tmp_path / "out", alpha=0.5, progress=False)
    b, out = _state(base), _state(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name], 0.5 * b[name] + 0.5 * merged_adapter[name], rtol=0, atol=1e-6)
    assert not torch.equal(out[name], b[name])


def test_merge_cli_linear_partwise_and_recipe(pair, tmp_path, capsys):
    from hf_align.cli import main

    base, aligned = pair
    common = ["merge", "--base_model_name_or_path", str(base), "--model_name_or_path", str(aligned), "--disable_tqdm"]
    argv = [*common, "--alpha", "0.3", "--output_dir", str(tmp_path / "lin"), "--max_shard_size", "30KB"]
    assert main(argv) == 0
    _assert_formula(tmp_path / "lin", base, aligned, lambda name: 0.3)
    argv = [*common, "--pivots", "1,3", "--alphas", "0.4,0.3,0.2", "--embed_alpha", "0.7", "--head_alpha", "0.9"]
    assert main([*argv, "--output_dir", str(tmp_path / "part")]) == 0
    _assert_formula(tmp_path / "part", base, aligned, _expected_partwise_alpha)
    assert "layers 2–3" in capsys.readouterr().out
    # the recipe's pivots (10#20) do not fit a 6-layer model: a clear error, nothing written
    assert main([*common, "--config", "recipes/ama/partwise.yaml", "--output_dir", str(tmp_path / "r")]) == 2
    assert "last part empty" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main([*common, "--output_dir", str(tmp_path / "x")]) == 2  # neither --alpha nor --alphas
    both = ["--alpha", "0.3", "--alphas", "0.1,0.2", "--pivots", "1", "--output_dir", str(tmp_path / "x")]
    assert main([*common, *both]) == 2
    assert "not both or neither" in capsys.readouterr().err
