"""GPT-2-style ``Conv1D`` weights are stored (in, out): a neuron (one output feature) is a *column* there.

Masks, deltas, scores and layer indices must treat it so; before, a 10 % "row" mask selected input features of
``c_attn`` and trained several times the parameters it claimed.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_align.architectures import checkpoint_neuron_axes, layer_index, neuron_axes
from hf_align.masks import NeuronMask
from hf_align.scores import reduce_magnitude, weight_diff_scores
from hf_align.sparse_update import attach_deltas, iter_deltas, merged_state_dict, trainable_fraction
from hf_align.testbed import quiet_training_args


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def _conv1d_weights(model):
    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, Conv1D)}


def test_neuron_axes_name_every_conv1d_weight_and_nothing_else():
    model = _gpt2()
    conv = _conv1d_weights(model)
    assert set(neuron_axes(model)) == set(conv) and set(neuron_axes(model).values()) == {1}
    assert len(conv) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks


def test_row_masks_have_one_entry_per_output_feature():
    model = _gpt2()
    mask = NeuronMask.random(model, 0.1, "row", seed=0)
    conv = _conv1d_weights(model)
    for name, module in conv.items():
        assert mask.masks[name].shape == (module.nf,)  # Conv1D.nf = output features = weight.shape[1]
    assert mask.masks["transformer.h.0.attn.c_attn.weight"].shape == (48,)  # 3 * n_embd, not n_embd


def test_trainable_fraction_counts_columns_of_conv1d():
    model = _gpt2()
    mask = NeuronMask.random(model, 0.1, "row", seed=0)
    params = dict(model.named_parameters())
    by_hand = sum(int(m.sum()) * params[n].numel() // m.numel() for n, m in mask.masks.items())
    total = sum(p.numel() for p in model.parameters())
    attach_deltas(model, mask)
    assert trainable_fraction(model) == pytest.approx(by_hand / total, rel=1e-12)
    assert sum(h.delta.numel() for h in iter_deltas(model)) == by_hand


def test_conv1d_delta_adds_to_the_selected_columns_only():
    model = _gpt2()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = NeuronMask.random(model, 0.25, "row", seed=1)
    attach_deltas(model, mask)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for holder in iter_deltas(model):
            holder.delta.copy_(torch.randn(holder.delta.shape, generator=generator))
    merged = merged_state_dict(model)
    name = "transformer.h.1.mlp.c_fc.weight"
    columns = mask.masks[name].nonzero().view(-1)
    holder = next(h for h in iter_deltas(model) if h.param_name == name)
    expected = original[name].clone()
    expected[:, columns] += holder.delta  # written out: Δ is (in, k), added at the selected output columns
    torch.testing.assert_close(merged[name], expected, atol=0, rtol=0)
    x = torch.randn(3, 16, generator=generator)
    module = model.get_submodule("transformer.h.1.mlp.c_fc")
    torch.testing.assert_close(module(x), x @ expected + original["transformer.h.1.mlp.c_fc.bias"])


def test_training_moves_only_selected_columns():
    model = _gpt2()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = NeuronMask.random(model, 0.1, "row", seed=2)
    attach_deltas(model, mask)
    optimizer = torch.optim.SGD([h.delta for h in iter_deltas(model)], lr=0.5)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    merged = merged_state_dict(model)
    moved = 0
    for name in _conv1d_weights(model):
        selected = mask.masks[name]
        assert torch.equal(merged[name][:, ~selected], original[name][:, ~selected]), name  # frozen bit for bit
        changed = (merged[name] != original[name]).any(dim=0)
        assert torch.equal(changed, selected), name  # every selected column moved, no other one
        moved += int(selected.sum())
    assert moved > 0


def test_row_scores_sum_over_the_input_axis_of_conv1d(tmp_path):
    delta = torch.arange(12.0).view(3, 4) - 5.0  # (in=3, out=4)
    torch.testing.assert_close(reduce_magnitude(delta, "row", axis=1), delta.abs().sum(0))
    torch.testing.assert_close(reduce_magnitude(delta, "row"), delta.abs().sum(1))  # a Linear's rows
    init, trained = _gpt2(), _gpt2()
    name = "transformer.h.0.attn.c_attn.weight"
    with torch.no_grad():
        trained.get_parameter(name)[:, 7] += 0.5  # one output feature moves, over all 16 inputs
    init.save_pretrained(tmp_path / "init")
    trained.save_pretrained(tmp_path / "trained")
    assert checkpoint_neuron_axes(tmp_path / "init") == neuron_axes(init)
    scores = weight_diff_scores(tmp_path / "init", tmp_path / "trained", granularity="row", target=name)
    assert scores[name].shape == (48,)
    assert scores[name].nonzero().view(-1).tolist() == [7]
    assert scores[name][7].item() == pytest.approx(16 * 0.5, rel=1e-5)


def test_mask_validation_names_the_output_feature_count():
    model = _gpt2()
    name = "transformer.h.0.attn.c_attn.weight"
    with pytest.raises(ValueError, match=r"c_attn.weight.*\(48,\) \(row: one per output feature, axis 1 of a Conv1D"):
        NeuronMask({name: torch.ones(16, dtype=torch.bool)}).validate(model)


def test_one_layer_index_rule_for_gpt2_and_llama_names():
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("transformer.wte.weight") is None
    fractions = NeuronMask.random(_gpt2(), 0.5, "row", seed=0).per_layer_fraction()
    assert {layer for layer, _ in fractions} == {0, 1}


def test_masked_dpo_on_gpt2_trains_the_fraction_it_reports(tmp_path, tokenizer):
    from hf_align import testbed
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=16, n_layer=2, n_head=2))
    mask = NeuronMask.random(model, 0.1, "row", seed=0)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = MaskedDPOConfig(**quiet_training_args(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
        gradient_checkpointing=False, learning_rate=1e-2,
    ))  # fmt: skip
    trainer = MaskedDPOTrainer(
        model=model, args=args, train_dataset=testbed.preference_dataset(4), processing_class=tokenizer,
        neuron_mask=mask,
    )  # fmt: skip
    # each selected output feature of a Conv1D weight (in, out) is a column of `in` entries
    trained = sum(int(selected.sum()) * original[n].shape[0] for n, selected in mask.masks.items())
    assert trainer.trainable_fraction == pytest.approx(trained / sum(p.numel() for p in original.values()))
    trainer.train()
    merged = merged_state_dict(trainer.model)
    for name, selected in mask.masks.items():
        frozen = ~selected
        assert torch.equal(merged[name][:, frozen], original[name][:, frozen]), name


def test_element_scores_become_column_rows_for_conv1d_in_the_trainer_config(tmp_path, tokenizer):
    """``neuron_scores_path`` + ``neuron_mask_granularity='row'`` reduces full-shape scores over the input axis of a
    Conv1D weight (one score per output feature), with the model the trainer was given."""
    from hf_align.scores import save_scores
    from hf_align.trainers import MaskedDPOConfig
    from hf_align.trainers._masking import resolve_neuron_mask

    model = _gpt2()
    name = "transformer.h.0.mlp.c_fc.weight"  # (in=16, out=64)
    scores = {name: torch.zeros(16, 64)}
    scores[name][:, 5] = 1.0  # output feature 5 is the only one that moved
    save_scores(tmp_path / "scores", scores)
    args = MaskedDPOConfig(**quiet_training_args(output_dir=str(tmp_path / "o"), neuron_scores_path=str(tmp_path / "scores"), neuron_mask_ratio=1 / 64))  # fmt: skip
    mask = resolve_neuron_mask(None, args, model)
    assert mask.masks[name].shape == (64,) and mask.masks[name].nonzero().view(-1).tolist() == [5]
