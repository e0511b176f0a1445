"""MaskedDPOTrainer: exact vs trl.DPOTrainer in the degenerate cases, masks, token weights, save/resume."""

import copy
import math

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from hf_align import testbed
from hf_align.trainers.masked_dpo import MaskedDPOConfig, MaskedDPOTrainer


STEPS = 3


def _args(tmp_path, cls=MaskedDPOConfig, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        beta=0.1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=False,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def _model():
    return testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64)


def _data(n=12, conversational=False):
    return testbed.preference_dataset(n, seed=0, conversational=conversational).remove_columns(
        "rejected_wrong_positions"
    )


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _train(cls, args, tokenizer, dataset, model=None, **kwargs):
    model = model if model is not None else _model()
    ref = kwargs.pop("ref_model", "copy")
    trainer = cls(
        model=model,
        ref_model=copy.deepcopy(model) if ref == "copy" else ref,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    return trainer


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_no_mask_no_weights_equals_trl(tmp_path, tokenizer, loss_type):
    data = _data()
    ours = _train(MaskedDPOTrainer, _args(tmp_path, loss_type=[loss_type]), tokenizer, data)
    theirs = _train(DPOTrainer, _args(tmp_path, cls=DPOConfig, loss_type=[loss_type]), tokenizer, data)
    ours_losses, their_losses = _losses(ours), _losses(theirs)
    assert len(ours_losses) == STEPS
    assert ours_losses == pytest.approx(their_losses, abs=1e-6)
    assert ours_losses[0] != ours_losses[-1]  # it did train
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
