"""hf_align.generation: the one seeded sampler leaves the caller's RNG as it was and reproduces its samples."""

from __future__ import annotations

import pytest
import torch

from hf_align import testbed
from hf_align.generation import generate_texts, sample, sample_token_ids, seeded, until_eos


@pytest.fixture(scope="module")
def tb():
    return testbed.load()


def test_sampler_restores_the_cpu_rng_and_reproduces(tb):
    prompts = testbed.evaluation.eval_prompts(6, seed=1)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = generate_texts(tb.model, tb.tokenizer, prompts, seed=4, max_new_tokens=6, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    expected_next = torch.rand(4)
    torch.random.set_rng_state(before)
    again = generate_texts(tb.model, tb.tokenizer, prompts, seed=4, max_new_tokens=6, batch_size=4)
    assert again == first
    torch.testing.assert_close(torch.rand(4), expected_next)  # sampling did not shift the next draw
    # hf-align eval's protocol: batch i seeded with seed + i
    by_batch = sample(tb.model, tb.tokenizer, prompts, seed=4, max_new_tokens=6, batch_size=4)
    assert by_batch[:4] == first[:4]
    assert by_batch[4:] == generate_texts(tb.model, tb.tokenizer, prompts[4:], seed=5, max_new_tokens=6)


def test_seeded_restores_the_rng_when_the_body_raises():
    before = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"), seeded(7):
        torch.rand(10)
        raise RuntimeError("boom")
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeded(7):
        a = torch.rand(3)
    with seeded(7):
        b = torch.rand(3)
    torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_restores_the_cuda_rng():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.rand(1, device=device)
    before = torch.cuda.get_rng_state(device)
    with pytest.raises(RuntimeError, match="boom"), seeded(7, device):
        torch.rand(10, device=device)
        raise RuntimeError("boom")
    assert torch.equal(torch.cuda.get_rng_state(device), before)


def test_token_ids_stop_at_eos_and_greedy_ignores_the_seed(tb):
    tok = tb.tokenizer
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in ["1+2=", "rev 4821="]]
    greedy = [
        sample_token_ids(tb.model, prompt_ids, tok.pad_token_id, tok.eos_token_id, seed=s, do_sample=False)
        for s in (0, 1)
    ]
    assert greedy[0] == greedy[1]
    for ids in greedy[0]:
        assert tok.eos_token_id not in ids[:-1]
    assert until_eos([5, 6, 2, 0, 0], eos=2, pad_id=0) == [5, 6, 2]
    assert until_eos([5, 0, 6], eos=2, pad_id=0) == [5, 6]
    assert tb.model.training is False
