"""NPOTrainer with a neuron mask: only selected rows/entries move, the reference is the start model; testbed forgetting."""

import copy

import pytest
import torch

from hf_align import testbed
from hf_align.masks import NeuronMask
from hf_align.sparse_update import deltas_disabled, merged_state_dict
from hf_align.testbed import quiet_training_args
from hf_align.trainers import NPOConfig, NPOTrainer


def _args(tmp_path, **kw):
    base = quiet_training_args(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        weight_decay=0.1,  # decay must not leak into unselected entries either
        gradient_checkpointing=False,
        logging_steps=1,
    )
    base.update(kw)
    return NPOConfig(**base)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("granularity", ["row", "element"])
def test_masked_npo_moves_only_selected_entries_and_reference_is_the_start_model(tmp_path, granularity, level):
    tok = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    start_model = copy.deepcopy(model)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mask = NeuronMask.random(model, 0.1, granularity, seed=0)
    trainer = NPOTrainer(
        model,
        args=_args(tmp_path, npo_level=level),
        train_dataset=testbed.forget_dataset(12),
        processing_class=tok,
        neuron_mask=mask,
    )
    assert trainer._ref_mode == "deltas_off"  # no second copy: the reference is the model with its deltas off
    assert 0 < trainer.trainable_fraction < 0.2
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.train()

    after = merged_state_dict(trainer.model)
    assert set(after) == set(start)
    moved = selected_total = 0
    for name, before in start.items():
        selected = mask.masks.get(name)
        if selected is None:
            assert torch.equal(after[name], before), name
            continue
        chosen = selected if selected.shape == before.shape else selected[:, None].expand_as(before)
        assert torch.equal(after[name][~chosen], before[~chosen]), name
        moved += int((after[name][chosen] != before[chosen]).sum())
        selected_total += int(chosen.sum())
    assert selected_total > 0 and moved > 0.5 * selected_total, (moved, selected_total)

    # Reference = deltas disabled = the start model, exactly; the trained policy differs.
    reference = _logits_deltas_off(trainer.model, batch)
    expected = _logits(start_model, batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)
    assert not torch.allclose(_logits(trainer.model, batch), expected, atol=1e-4)
    # ... and the trainer's own reference log-probs are the start model's per-token log-probs.
    labels = batch["labels"][:, 1:]
    start_logps = expected[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    completion = labels != -100
    ref_logps = trainer._reference_log_probs(batch)
    torch.testing.assert_close(ref_logps[completion], start_logps[completion], rtol=1e-5, atol=1e-5)


def _logits_deltas_off(model, batch):
    with deltas_disabled(model):
        return _logits(model, batch)


def test_npo_lowers_the_forget_rate_on_the_testbed(tmp_path):
    """Token-level NPO on the ' ugh' marker tokens of the forget set: sampled completions end in ' ugh' far less."""
    from hf_align.token_weights import weights_from_char_spans

    tb = testbed.load()
    tok = tb.tokenizer
    before = tb.mean_reward(num_prompts=256)["forget_rate"]
    assert before > 0.15  # the shipped model learned the marker (25 % of its pre-training rows)

    def marker_weights(ex):
        span = [(ex["completion"].index(" ugh"), len(ex["completion"]))]
        return {"completion_weights": weights_from_char_spans(tok, ex["prompt"], ex["completion"], span, special=0.0)}

    forget = tb.forget_dataset(64).map(marker_weights)
    args = _args(
        tmp_path, npo_level="token", max_steps=8, per_device_train_batch_size=8, weight_decay=0.0,
        precompute_ref_log_probs=True,
    )  # fmt: skip
    trainer = NPOTrainer(copy.deepcopy(tb.model), args=args, train_dataset=forget, processing_class=tok)
    trainer.train()
    after = tb.mean_reward(trainer.model, num_prompts=256)["forget_rate"]
    assert after < 0.5 * before, (before, after)
