"""The README's architecture table, tested: masks + deltas and merges on every architecture it marks as tested."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_align.masks import NeuronMask
from hf_align.merging import merge_models, partwise_plan
from hf_align.sparse_update import attach_deltas, iter_deltas, merged_state_dict
from hf_align.testbed import load_random_tiny


def _model(architecture):
    if architecture == "gpt2":
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=2))
    return load_random_tiny(architecture, hidden_size=32, num_layers=3, intermediate_size=64, vocab_size=64)


@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_masked_training_moves_exactly_the_selected_neurons(architecture, granularity):
    model = _model(architecture).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = NeuronMask.random(model, 0.2, granularity, seed=0)
    attach_deltas(model, mask)
    optimizer = torch.optim.SGD([h.delta for h in iter_deltas(model)], lr=0.5)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    merged = merged_state_dict(model)
    moved = 0
    for name, selected in mask.masks.items():
        changed = merged[name] != before[name]
        if selected.dim() == 1 and changed.dim() == 2:  # a row mask: one entry per output feature
            axis = 1 if architecture == "gpt2" else 0
            changed = changed.any(dim=1 - axis)
        assert not bool((changed & ~selected).any()), name  # frozen entries bit for bit
        moved += int(changed.sum())
    assert moved > 0
    for name in before.keys() - mask.masks.keys():
        if name in merged:
            assert torch.equal(merged[name], before[name]), name


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_partwise_merge_groups_decoder_layers_of_every_naming(tmp_path, architecture):
    base, aligned = _model(architecture), _model(architecture)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(1.0)
    base.save_pretrained(tmp_path / "base")
    aligned.save_pretrained(tmp_path / "aligned")

    def plan(names, config):
        return partwise_plan(names, pivots="0#1", alphas="0.1|0.5|0.9", num_layers=3)

    result = merge_models(tmp_path / "base", tmp_path / "aligned", tmp_path / "merged", plan=plan, progress=False)
    by_layer = {}
    for name, alpha in result.plan.alphas.items():
        for index in range(3):
            if f".{index}." in name and (".layers." in name or ".h." in name):
                by_layer.setdefault(index, set()).add(alpha)
    assert by_layer == {0: {0.1}, 1: {0.5}, 2: {0.9}}
