"""Trainable deltas at masked rows/entries, against plain autograd references and hand-written optimizers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_align import testbed
from hf_align.masks import NeuronMask
from hf_align.sparse_update import (
    DELTAS_FILE,
    MaskedAdamW,
    _DeltaLinear,
    attach_deltas,
    deltas_disabled,
    has_deltas,
    iter_deltas,
    load_deltas,
    merge_deltas,
    merged_state_dict,
    save_deltas,
    trainable_fraction,
)


IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 8, 120], [1, 2, 64, 33, 12, 9, 250, 4]])


def _tiny(**overrides):
    return testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=48, **overrides)


def _randomize_deltas(model, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for holder in iter_deltas(model):
            holder.delta.copy_(torch.randn(holder.delta.shape, generator=generator) * scale)


def _plain_copy(base, model):
    """A plain copy of ``base`` whose weights are W + scatter(Δ), written by hand from the deltas of ``model``."""
    plain = copy.deepcopy(base)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for holder in iter_deltas(model):
            weight = params[holder.param_name]
            index = holder.index.long()
            if holder.row:
                weight[index] += holder.delta
            else:
                weight.view(-1)[index] += holder.delta
    return plain


def _loss(logits):
    return logits.float().pow(2).mean() + logits[..., 3].float().mean()


# --------------------------------------------------------------------------------------------- row fast path
def _row_case(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=generator, dtype=dtype)
    bias = torch.randn(7, generator=generator, dtype=dtype)
    rows = torch.tensor([1, 4, 6])
    delta = (torch.randn(3, 5, generator=generator) * 0.1).to(dtype).requires_grad_()
    x = torch.randn(2, 4, 5, generator=generator).requires_grad_()
    grad_out = torch.randn(2, 4, 7, generator=generator)
    return weight, bias, rows, delta, x, grad_out


def test_row_function_forward_and_grads_equal_autograd_reference():
    weight, bias, rows, delta, x, grad_out = _row_case()
    out = _DeltaLinear.apply(x, weight, bias, rows.to(torch.int32), delta, True)
    grad_x, grad_delta = torch.autograd.grad(out, (x, delta), grad_out)
    ref = F.linear(x, weight.index_add(0, rows, delta), bias)
    ref_x, ref_delta = torch.autograd.grad(ref, (x, delta), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_delta, ref_delta, rtol=1e-6, atol=1e-6)
    # a bias that trains too (its own element delta) gets the reference gradient
    bias_param = bias.clone().requires_grad_()
    out = _DeltaLinear.apply(x, weight, bias_param, rows, delta, True)
    (grad_bias,) = torch.autograd.grad(out, (bias_param,), grad_out)
    torch.testing.assert_close(grad_bias, grad_out.sum(dim=(0, 1)))


def _pattern(index, shape):
    from hf_align.sparse_update import _csr_pattern

    return _csr_pattern(index, shape, torch.device("cpu"))


@pytest.mark.parametrize("sampled", [False, True])
def test_element_function_forward_and_grads_equal_autograd_reference(sampled):
    """Element deltas on a Linear: same outputs and gradients as autograd through W + scatter(Δ). ``sampled``: only
    the selected entries of dYᵀX are computed, the same T-term sums in another order (fp32: a few ulps)."""
    weight, bias, _, _, x, grad_out = _row_case()
    index = torch.tensor([0, 3, 8, 17, 34])
    pattern = _pattern(index, (7, 5)) if sampled else None
    delta = (torch.randn(5, generator=torch.Generator().manual_seed(1)) * 0.1).requires_grad_()
    out = _DeltaLinear.apply(x, weight, bias, index.to(torch.int32), delta, False, pattern)
    grad_x, grad_delta = torch.autograd.grad(out, (x, delta), grad_out)
    ref = F.linear(x, weight.reshape(-1).index_add(0, index, delta).view_as(weight), bias)
    ref_x, ref_delta = torch.autograd.grad(ref, (x, delta), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_delta, ref_delta, rtol=1e-6, atol=1e-6)
    # written out: dW[r, c] = sum over tokens of dY[t, r] * X[t, c], in float64
    g, inputs = grad_out.reshape(-1, 7).double(), x.detach().reshape(-1, 5).double()
    by_hand = torch.stack([(g[:, int(i) // 5] * inputs[:, int(i) % 5]).sum() for i in index])
    torch.testing.assert_close(grad_delta.double(), by_hand, rtol=1e-6, atol=1e-6)


def test_sampled_element_gradient_in_bf16_is_the_rounded_exact_sum():
    """bf16 operands: the products are exact in fp32 and summed there, then rounded once to the bf16 delta, so
    each entry is within one bf16 ulp (2**-8 relative) of the float64 sum; the dense bf16 GEMM is held to the same."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 16, generator=generator).bfloat16()
    x = torch.randn(3, 40, 16, generator=generator).bfloat16().requires_grad_()
    grad_out = torch.randn(3, 40, 12, generator=generator).bfloat16()
    index = torch.randperm(12 * 16, generator=generator)[:30].sort().values
    exact = (grad_out.reshape(-1, 12).double().t() @ x.detach().reshape(-1, 16).double()).view(-1)[index]
    for pattern in (None, _pattern(index, (12, 16))):
        delta = torch.zeros(30, dtype=torch.bfloat16, requires_grad=True)
        out = _DeltaLinear.apply(x, weight, None, index.to(torch.int32), delta, False, pattern)
        (grad_delta,) = torch.autograd.grad(out, (delta,), grad_out)
        assert grad_delta.dtype == torch.bfloat16
        assert ((grad_delta.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-30).all(), pattern is None


@pytest.mark.parametrize("row", [True, False])
def test_fused_function_leaves_the_frozen_weight_bit_identical_and_other_graphs_valid(row):
    """The delta is added to W's storage around each GEMM and the selected entries are copied back after: W must
    come out bit-identical, and a graph that saved W before (a plain forward) must still back-propagate right."""
    weight, bias, rows, delta, x, grad_out = _row_case()
    index = rows if row else torch.tensor([0, 3, 8, 17, 34])
    if not row:
        delta = (torch.randn(5, generator=torch.Generator().manual_seed(1)) * 0.1).requires_grad_()
    before = weight.clone()
    plain_weight = weight.requires_grad_()  # a graph that saves W (for its own gradient) before the fused calls
    plain = F.linear(x, plain_weight, bias)
    out = _DeltaLinear.apply(x, weight.detach(), bias, index.to(torch.int32), delta, row)
    torch.autograd.grad(out, (x, delta), grad_out)
    assert torch.equal(weight.detach(), before)
    grad_x, grad_w = torch.autograd.grad(plain, (x, plain_weight), grad_out)
    torch.testing.assert_close(grad_x, grad_out @ before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_w, grad_out.reshape(-1, 7).t() @ x.reshape(-1, 5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("row", [True, False])
def test_fused_function_with_every_entry_selected_equals_autograd_reference(row):
    """A ratio-1.0 mask takes the dense path (W + Δ, the weight gradient as Δ's): same values as the scatter."""
    weight, bias, _, _, x, grad_out = _row_case()
    index = torch.arange(7 if row else 35, dtype=torch.int32)
    generator = torch.Generator().manual_seed(2)
    delta = (torch.randn((7, 5) if row else (35,), generator=generator) * 0.1).requires_grad_()
    out = _DeltaLinear.apply(x, weight, bias, index, delta, row)
    grad_x, grad_delta = torch.autograd.grad(out, (x, delta), grad_out)
    flat = weight.reshape(-1).index_add(0, torch.arange(35), delta.reshape(-1))
    ref = F.linear(x, flat.view_as(weight), bias)
    ref_x, ref_delta = torch.autograd.grad(ref, (x, delta), grad_out)
    assert torch.equal(out, ref)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_delta, ref_delta, rtol=1e-6, atol=1e-6)


def test_row_function_under_cpu_bf16_autocast():
    weight, bias, rows, delta, x, grad_out = _row_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _DeltaLinear.apply(x, weight, bias, rows, delta, True)
        ref = F.linear(x, weight.index_add(0, rows, delta), bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    grad_x, grad_delta = torch.autograd.grad(out, (x, delta), grad_out.bfloat16())
    ref_x, ref_delta = torch.autograd.grad(ref, (x, delta), grad_out.bfloat16())
    assert grad_x.dtype == ref_x.dtype == torch.float32 and grad_delta.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(grad_x, ref_x, rtol=1.6e-2, atol=3e-2)
    torch.testing.assert_close(grad_delta, ref_delta, rtol=1.6e-2, atol=3e-2)
    # and both stay within bf16 error of the fp32 result
    fp32 = F.linear(x, weight.index_add(0, rows, delta), bias)
    torch.testing.assert_close(out.float(), fp32, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("row", [True, False])
def test_autocast_input_is_cast_once_and_saved_in_the_autocast_dtype(row):
    """Layers that read one fp32 activation (q/k/v, gate/up) under bf16 autocast keep one shared bf16 copy of it
    for backward, not the fp32 input each (twice the bytes); outputs and delta gradients stay plain autocast's."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, generator=generator).requires_grad_()
    index = torch.tensor([1, 4, 6]) if row else torch.tensor([0, 3, 8, 17, 34])
    layers = []
    for _ in range(3):
        weight = torch.randn(7, 5, generator=generator)
        delta = (torch.randn(index.numel(), *([5] if row else []), generator=generator) * 0.1).requires_grad_()
        layers.append((weight, delta))
    saved_inputs = []

    def pack(tensor):
        if tuple(tensor.shape) == tuple(x.shape):
            saved_inputs.append((tensor.dtype, tensor.data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [_DeltaLinear.apply(x, w, None, index.to(torch.int32), d, row) for w, d in layers]
    assert len(saved_inputs) == 3 and {dtype for dtype, _ in saved_inputs} == {torch.bfloat16}
    assert len({ptr for _, ptr in saved_inputs}) == 1  # one cast, shared
    merged = [w.index_add(0, index, d) if row else w.reshape(-1).index_add(0, index, d).view_as(w) for w, d in layers]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        refs = [F.linear(x, w) for w in merged]
    assert all(torch.equal(out, ref) for out, ref in zip(outs, refs, strict=True))
    grad_out = torch.randn(2, 4, 7, generator=generator).bfloat16()
    deltas = [d for _, d in layers]
    grads = torch.autograd.grad(sum((o.float() * grad_out).sum() for o in outs), deltas)
    ref_grads = torch.autograd.grad(sum((r.float() * grad_out).sum() for r in refs), deltas)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_model_with_deltas_equals_plain_model_with_merged_weights(granularity, sampled=0.0):
    base = _tiny()
    model = copy.deepcopy(base)
    mask = NeuronMask.random(model, 0.2, granularity, seed=1)
    attach_deltas(model, mask, sampled_gradient_density=sampled)
    if granularity == "row":  # the fused function, not the parametrization, runs the Linear
        assert "forward" in model.model.layers[0].mlp.up_proj.__dict__
    _randomize_deltas(model)
    plain = _plain_copy(base, model)
    logits = model(IDS).logits
    ref = plain(IDS).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    _loss(logits).backward()
    _loss(ref).backward()
    ref_params = dict(plain.named_parameters())
    for holder in iter_deltas(model):
        full = ref_params[holder.param_name].grad
        expected = full[holder.index.long()] if holder.row else full.reshape(-1)[holder.index.long()]
        torch.testing.assert_close(holder.delta.grad, expected, rtol=1e-5, atol=1e-6, msg=holder.param_name)
    # only the deltas train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".delta") for n in trainable)


def test_sampled_gradient_is_chosen_per_module_by_density_and_matches_the_plain_model():
    """Only element-masked Linear layers whose selected fraction is <= the threshold take the sampled gradient
    (not the tied embedding / head, not norms, not row masks); their gradients equal the plain model's."""
    base = _tiny()
    model = copy.deepcopy(base)
    densities = {"q_proj": 0.05, "v_proj": 0.4}  # the other parameters: 0.2

    def density(name):
        return next((d for key, d in densities.items() if key in name), 0.2)

    shapes = {n: p.shape for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    mask = NeuronMask(
        {n: torch.rand(shape, generator=generator) < density(n) for n, shape in shapes.items()},
        {"granularity": "element"},
    )
    attach_deltas(model, mask, sampled_gradient_density=0.3)
    chosen = {h.param_name for h in iter_deltas(model) if h.pattern is not None}
    linear = {n for n in shapes if n.endswith("_proj.weight")}
    assert chosen == {n for n in linear if "v_proj" not in n}
    assert "sampled gradient" in repr(model.model.layers[0].self_attn.q_proj)
    _randomize_deltas(model)
    plain = _plain_copy(base, model)
    _loss(model(IDS).logits).backward()
    _loss(plain(IDS).logits).backward()
    ref_params = dict(plain.named_parameters())
    for holder in iter_deltas(model):
        expected = ref_params[holder.param_name].grad.reshape(-1)[holder.index.long()]
        torch.testing.assert_close(holder.delta.grad, expected, rtol=1e-5, atol=1e-6, msg=holder.param_name)
    # a threshold every module exceeds: the dense gradient everywhere (the default, 0, never samples)
    other = copy.deepcopy(base)
    attach_deltas(other, mask, sampled_gradient_density=0.01)
    assert all(h.pattern is None for h in iter_deltas(other))


def test_model_deltas_under_bf16_autocast_match_plain_model():
    base = _tiny()
    model = copy.deepcopy(base)
    attach_deltas(model, NeuronMask.random(model, 0.2, "row", seed=2))
    _randomize_deltas(model)
    plain = _plain_copy(base, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(IDS).logits
        ref = plain(IDS).logits
    torch.testing.assert_close(logits.float(), ref.float(), rtol=2e-2, atol=5e-2)
    _loss(logits).backward()
    _loss(ref).backward()
    ref_params = dict(plain.named_parameters())
    for holder in iter_deltas(model):
        expected = ref_params[holder.param_name].grad[holder.index.long()]
        assert holder.delta.grad.dtype == torch.float32
        scale = expected.abs().max()
        assert (holder.delta.grad - expected).abs().max() <= 0.05 * scale + 1e-4, holder.param_name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_delta_grads(use_reentrant):
    grads = []
    for checkpointing in (False, True):
        model = _tiny()
        rows = NeuronMask.random(model, 0.3, "row", seed=3, target="mlp")
        entries = NeuronMask.random(model, 0.3, "element", seed=4, target="self_attn")
        attach_deltas(model, rows.union(entries))
        _randomize_deltas(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        model.train()
        _loss(model(IDS).logits).backward()
        grads.append({h.param_name: h.delta.grad.clone() for h in iter_deltas(model)})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------- reference, merging
def test_deltas_disabled_gives_the_base_logits_exactly():
    base = _tiny()
    with torch.no_grad():
        expected = base(IDS).logits
    for granularity in ("row", "element"):
        model = copy.deepcopy(base)
        attach_deltas(model, NeuronMask.random(model, 0.3, granularity, seed=0))
        _randomize_deltas(model)
        with torch.no_grad():
            assert not torch.equal(model(IDS).logits, expected)
            with deltas_disabled(model):
                assert torch.equal(model(IDS).logits, expected)
            assert not torch.equal(model(IDS).logits, expected)  # switched back on


def test_tied_embeddings_share_the_delta_and_merge_loadably(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = testbed.load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = copy.deepcopy(base)
    mask = NeuronMask.random(model, 0.2, "element", seed=0, target=r"embed_tokens")
    assert list(mask.masks) == ["model.embed_tokens.weight"]
    attach_deltas(model, mask)
    _randomize_deltas(model, scale=0.5)
    assert len(list(iter_deltas(model))) == 1
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    plain = _plain_copy(base, model)  # tied: the hand-merged embedding is also the head
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(IDS).logits
        expected = plain(IDS).logits
        with deltas_disabled(model):
            base_logits = model(IDS).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(base_logits, base(IDS).logits)
    # the delta reaches the head: the head-only path (hidden @ lm_head.weight) changes too
    hidden = base.model(IDS).last_hidden_state
    assert not torch.allclose(hidden @ model.lm_head.weight.t(), hidden @ base.lm_head.weight.t())

    merged = merged_state_dict(model)
    assert set(merged) == set(base.state_dict())
    model.save_pretrained(tmp_path / "merged", state_dict=merged)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)

    merge_deltas(model)
    assert not has_deltas(model) and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.requires_grad for p in model.parameters())  # flags from before attaching are restored
    model.save_pretrained(tmp_path / "folded")
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_trainable_fraction_by_hand():
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    rows = NeuronMask.random(model, 0.25, "row", seed=0)
    params = dict(model.named_parameters())
    expected = sum(int(m.sum()) * params[n].shape[1] for n, m in rows.masks.items()) / total
    attach_deltas(model, rows)
    assert trainable_fraction(model) == pytest.approx(expected, rel=1e-12)
    other = _tiny()
    entries = NeuronMask.random(other, 0.1, seed=0)
    attach_deltas(other, entries)
    assert trainable_fraction(other) == pytest.approx(round(0.1 * total) / total, rel=1e-12)


def test_attaching_twice_errors():
    model = _tiny()
    mask = NeuronMask.random(model, 0.1, "row")
    attach_deltas(model, mask)
    with pytest.raises(ValueError, match="already has neuron deltas"):
        attach_deltas(model, mask)


def test_save_load_deltas_round_trip_and_errors(tmp_path):
    base = _tiny()
    model = copy.deepcopy(base)
    mask = NeuronMask.random(model, 0.2, "row", seed=5)
    attach_deltas(model, mask)
    _randomize_deltas(model)
    with torch.no_grad():
        expected = model(IDS).logits
    save_deltas(model, tmp_path / "d", mask)
    assert (tmp_path / "d" / DELTAS_FILE).exists()

    fresh = copy.deepcopy(base)
    load_deltas(fresh, tmp_path / "d")  # attaches with the saved mask
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)
    attached = copy.deepcopy(base)
    attach_deltas(attached, mask)
    load_deltas(attached, tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(attached(IDS).logits, expected)

    other = copy.deepcopy(base)
    attach_deltas(other, NeuronMask.random(other, 0.2, "row", seed=6))  # same names and counts, other rows
    with pytest.raises(ValueError, match="another mask"):
        load_deltas(other, tmp_path / "d")
    with pytest.raises(ValueError, match="another mask"):
        save_deltas(other, tmp_path / "x", mask)
    narrower = copy.deepcopy(base)
    attach_deltas(narrower, NeuronMask.random(narrower, 0.2, "row", seed=5, target="mlp"))
    with pytest.raises(ValueError, match="other parameters"):
        load_deltas(narrower, tmp_path / "d")

    tensors = load_file(str(tmp_path / "d" / DELTAS_FILE))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "d" / DELTAS_FILE))
    with pytest.raises(ValueError, match=rf"Delta '{name}'.*has shape"):
        load_deltas(copy.deepcopy(base), tmp_path / "d")
    (tmp_path / "d" / DELTAS_FILE).write_bytes(b"broken")
    with pytest.raises(ValueError, match=DELTAS_FILE):
        load_deltas(copy.deepcopy(base), tmp_path / "d")


# --------------------------------------------------------------------------------------------- MaskedAdamW
def _hf_adamw_masked(param, grads, mask, lr, betas, eps, weight_decay):
    """transformers' AdamW (correct_bias=True) step by step, with the update multiplied by the mask (ALLO)."""
    p = param.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    mask = mask.float() if mask.shape == p.shape else mask.float().view(-1, 1).expand_as(p)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step_size = lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t)
        p = p - step_size * (m / (v.sqrt() + eps)) * mask
        p = p - lr * weight_decay * p
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("granularity", ["element", "row"])
def test_masked_adamw_equals_hand_hf_adamw_times_mask(granularity, weight_decay):
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    grads = [torch.randn(6, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    mask = (
        torch.rand(6, 4, generator=generator) < 0.4 if granularity == "element" else torch.tensor([1, 0, 0, 1, 1, 0])
    )
    mask = mask.bool()
    param = torch.nn.Parameter(start.clone())
    opt = MaskedAdamW(
        [{"params": [param], "mask": mask}], lr=0.01, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay
    )
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = _hf_adamw_masked(start, grads, mask, 0.01, (0.9, 0.98), 1e-6, weight_decay)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)
    frozen = ~(mask if mask.shape == start.shape else mask.view(-1, 1).expand_as(start))
    if weight_decay == 0.0:
        assert torch.equal(param.detach()[frozen], start[frozen])
    else:  # as in ALLO: decay moves the "frozen" entries too
        torch.testing.assert_close(param.detach()[frozen], start[frozen] * (1 - 0.01 * 0.1) ** 3)


# ------------------------------------------------------------------------------------------------ 4-bit base
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4bit")
    testbed.load_random_tiny("llama", hidden_size=64, num_layers=2, intermediate_size=128).save_pretrained(path)
    return path


def _load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    return model


def test_4bit_base_row_deltas_train_disable_and_merge(tiny_dir):
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    model = _load_4bit(tiny_dir)
    model.train()  # the 4-bit layers' autograd path (eval without gradients repacks on AVX512-BF16 CPUs)
    with torch.no_grad():
        base_logits = model(IDS).logits
    mask = NeuronMask.random(model, 0.25, "row", seed=0)
    mask.validate(model)
    attach_deltas(model, mask)
    holders = list(iter_deltas(model))
    assert len(holders) == 14 and all(h.delta.dtype == torch.float32 for h in holders)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 14
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        loss = _loss(model(IDS).logits)
        loss.backward()
        assert all(h.delta.grad is not None and h.delta.grad.abs().sum() > 0 for h in holders)
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(IDS).logits
        with deltas_disabled(model):
            off = model(IDS).logits
    assert (trained - base_logits).abs().max() > 1e-3
    assert torch.equal(off, base_logits)

    merged = merged_state_dict(model)
    plain = AutoModelForCausalLM.from_config(model.config)  # same architecture, full precision
    assert set(merged) == set(plain.state_dict())
    layer = model.model.layers[1].mlp.down_proj
    holder = layer.neuron_delta
    dequantized = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    expected = dequantized.index_add(0, holder.index, holder.delta.detach())
    assert torch.equal(merged["model.layers.1.mlp.down_proj.weight"], expected)
    plain.load_state_dict(merged)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, trained, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="merged_state_dict"):
        merge_deltas(model)


def test_4bit_element_mask_is_refused_and_partial_targets_work(tiny_dir):
    model = _load_4bit(tiny_dir)
    mask = NeuronMask.random(model, 0.1, "element", seed=0, target="q_proj")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*4-bit.*row mask"):
        attach_deltas(model, mask)
    assert not has_deltas(model)  # refused before touching the model
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # element masks on the full-precision parts (embeddings, norms) still work next to 4-bit rows
    rows = NeuronMask.random(model, 0.5, "row", seed=0, target="v_proj")
    norms = NeuronMask.random(model, 0.5, "element", seed=0, target=r"norm")
    attach_deltas(model, rows.union(norms))
    model.train()
    _loss(model(IDS).logits).backward()
    grads = {h.param_name: h.delta.grad for h in iter_deltas(model)}
    assert any("v_proj" in n for n in grads) and any("norm" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_4bit_layer_repacked_by_an_eval_forward_is_restored_to_the_weights_it_used(tmp_path):
    """bitsandbytes repacks a Linear4bit for CPU inference after an eval forward without gradients; its own inverse
    leaves the block scales in the inference layout. keep_4bit_trainable restores data and scales: the dequantized
    weights equal the original ones up to the bf16 rounding of the scales, and gradients flow again."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_align.quantization import keep_4bit_trainable

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(testbed.MODEL_DIR, quantization_config=quantization, device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    original = [dequantize_4bit(m.weight.data, m.weight.quant_state).clone() for m in layers]
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    repacked = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers]
    restored = keep_4bit_trainable(model)
    assert restored == sum(repacked)
    for module, weight in zip(layers, original, strict=True):
        again = dequantize_4bit(module.weight.data, module.weight.quant_state)
        torch.testing.assert_close(again, weight, atol=4e-3 * float(weight.abs().max()), rtol=0)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


class _InitOnlyLinear(torch.nn.Linear):
    """A model's own Linear that changes only initialisation (its forward is nn.Linear's)."""


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_linear_subclasses_take_the_fused_path_only_when_they_keep_linear_forward(granularity):
    """A subclass with nn.Linear's forward runs the fused function (no full weight gradient); one with its own
    forward keeps the parametrization, so its own forward still runs. Both equal the hand-merged plain model."""
    base = _tiny()
    for layer in base.model.layers:
        for name, cls in (("q_proj", _InitOnlyLinear), ("v_proj", _ScaledLinear)):
            old = getattr(layer.self_attn, name)
            new = cls(old.in_features, old.out_features, bias=old.bias is not None)
            new.load_state_dict(old.state_dict())
            setattr(layer.self_attn, name, new)
    model = copy.deepcopy(base)
    attach_deltas(model, NeuronMask.random(model, 0.3, granularity, seed=0))
    _randomize_deltas(model)
    plain = _plain_copy(base, model)
    torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, rtol=1e-5, atol=1e-5)
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, q.in_features)
    assert q(x).grad_fn.name() == "_DeltaLinearBackward"
    assert v(x).grad_fn.name() != "_DeltaLinearBackward"
    torch.testing.assert_close(v(x), 2.0 * F.linear(x, v.weight), rtol=1e-6, atol=1e-6)
