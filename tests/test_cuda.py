"""What only a GPU can break (skipped without CUDA): bf16 delta dtypes, the 4-bit row path on CUDA kernels, no
host synchronisation in the delta hot path (the in-place add and restore), and equality with the CPU result."""

import copy

import pytest
import torch

from hf_align.masks import NeuronMask
from hf_align.sparse_update import attach_deltas, iter_deltas, merged_state_dict
from hf_align.testbed import load_random_tiny


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _tiny():
    return load_random_tiny("llama", hidden_size=64, num_layers=2, intermediate_size=128, vocab_size=128)


def _randomize_deltas(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for holder in iter_deltas(model):
            holder.delta.copy_(torch.randn(holder.delta.shape, generator=generator) * 0.01)


@pytest.mark.parametrize("delta_dtype", [None, torch.float32])
def test_bf16_base_with_bf16_or_fp32_deltas_matches_its_merged_weights(delta_dtype):
    model = _tiny().to("cuda", torch.bfloat16)
    attach_deltas(model, NeuronMask.random(model, 0.1, "row", seed=0), delta_dtype)
    assert {h.delta.dtype for h in iter_deltas(model)} == {delta_dtype or torch.bfloat16}
    _randomize_deltas(model)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    plain = _tiny().to("cuda", torch.bfloat16)
    plain.load_state_dict(merged_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_delta_hot_path_never_synchronises_and_leaves_the_base_bit_identical(granularity):
    """The fused function adds the delta to W in place around each GEMM and copies the entries back (stream-ordered
    kernels, no host round trip); W must come out bit-identical."""
    from hf_align.architectures import ROW_TARGET

    model = _tiny().to("cuda")
    attach_deltas(model, NeuronMask.random(model, 0.1, granularity, target=ROW_TARGET, seed=0))
    _randomize_deltas(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".original")}
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    model(ids).logits.sum().backward()  # warm-up: lazy init may sync once
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(ids).logits.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_cuda_forward_and_delta_gradients_equal_the_cpu_result():
    cpu = _tiny()
    attach_deltas(cpu, NeuronMask.random(cpu, 0.2, "row", seed=0))
    _randomize_deltas(cpu)
    gpu = copy.deepcopy(cpu).to("cuda")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cpu_loss = cpu(input_ids=ids, labels=ids).loss
    gpu_loss = gpu(input_ids=ids.cuda(), labels=ids.cuda()).loss
    cpu_loss.backward()
    gpu_loss.backward()
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(iter_deltas(cpu), iter_deltas(gpu), strict=True):
        torch.testing.assert_close(b.delta.grad.cpu(), a.delta.grad, atol=1e-5, rtol=1e-4)


def test_4bit_row_path_on_cuda_kernels_adds_the_delta_at_its_rows():
    import bitsandbytes as bnb

    layer = torch.nn.Linear(64, 32, bias=False)
    quantized = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized = quantized.to("cuda")
    model = torch.nn.Sequential(quantized)
    mask = NeuronMask({"0.weight": torch.arange(32) % 4 == 0})
    attach_deltas(model, mask)
    _randomize_deltas(model)
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    holder = next(iter_deltas(model))
    with torch.no_grad():
        expected = type(quantized).forward(quantized, x)
        expected[:, holder.index.long()] += (x @ holder.delta.to(x.dtype).t()).to(expected.dtype)
        torch.testing.assert_close(model(x), expected)
