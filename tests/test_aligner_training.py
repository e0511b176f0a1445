"""Aligner trains with TRL's SFTTrainer and DPOTrainer unchanged (reference = adapter disabled)."""

import math

import pytest
import torch
from peft import get_peft_model
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from hf_align import testbed
from hf_align.peft_tuners import AlignerConfig
from hf_align.testbed import quiet_training_args


def _args(config_cls, tmp_path, **kwargs):
    return config_cls(
        **quiet_training_args(
            output_dir=str(tmp_path),
            bf16=False,  # fp32: the base-untouched check compares logits exactly
            per_device_train_batch_size=8,
            per_device_eval_batch_size=32,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            logging_steps=1,
            seed=0,
            **kwargs,
        )
    )


@pytest.fixture
def tb():
    return testbed.load()


def _base_logits(model, tokenizer):
    input_ids = tokenizer(["rev 3814="], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_sft_trainer_lowers_the_loss(tb, tmp_path):
    base_logits = _base_logits(tb.model, tb.tokenizer)
    args = _args(SFTConfig, tmp_path, learning_rate=5e-2, max_steps=8, max_length=32)
    data = tb.sft_dataset(32, seed=11)  # 2 epochs; the loss is measured on the training rows
    trainer = SFTTrainer(
        model=tb.model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tb.tokenizer,
        peft_config=AlignerConfig(num_tokens=4),
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("aligner_" in n for n in trainable)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 1e-3, (before, after)
    with trainer.model.disable_adapter():  # the base weights were not touched
        torch.testing.assert_close(_base_logits(trainer.model, tb.tokenizer), base_logits, atol=0, rtol=0)


def test_dpo_trainer_raises_the_reward_margin(tb, tmp_path):
    """Reference = adapter disabled, so at init the implicit reward margin is exactly 0 and the loss log 2."""
    args = _args(DPOConfig, tmp_path, learning_rate=5e-2, max_steps=8, beta=0.1)
    data = tb.preference_dataset(32, seed=21)  # 2 epochs; margins are measured on the training pairs
    trainer = DPOTrainer(
        model=tb.model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tb.tokenizer,
        peft_config=AlignerConfig(num_tokens=4),
    )
    before = trainer.evaluate()
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/margins"] > 0.0
    assert after["eval_loss"] < math.log(2)


def test_dpo_trainer_copies_a_trained_aligner_into_its_reference_adapter(tb, tmp_path):
    """Passing a PeftModel (e.g. an Aligner-SFT model, the paper's DPO setup): TRL's frozen `ref` copy matches it."""
    model = get_peft_model(tb.model, AlignerConfig(num_tokens=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "aligner_" in name:
                param.add_(0.5)
    trainer = DPOTrainer(
        model=model,
        args=_args(DPOConfig, tmp_path, max_steps=1),
        train_dataset=tb.preference_dataset(8, seed=23),
        processing_class=tb.tokenizer,
    )
    params = dict(trainer.model.named_parameters())
    defaults = [n for n in params if ".default." in n]
    assert len(defaults) == 1 + 4  # tokens + one gate per adapted layer (6 layers, start_layer=2)
    for name in defaults:
        ref = params[name.replace(".default.", ".ref.")]
        assert not ref.requires_grad
        torch.testing.assert_close(ref, params[name], atol=0, rtol=0)


def test_an_aligner_dpo_step_at_learning_rate_zero_says_it_trained_nothing(tb, tmp_path):
    """The shipped recipe's first step (warmup: lr 0, zero-initialised gate): loss log 2 and one line saying why."""
    from hf_align.callbacks import NoOpWarningCallback, add_default_callbacks

    args = _args(DPOConfig, tmp_path, learning_rate=5e-2, max_steps=1, beta=0.1)
    args.lr_scheduler_type, args.warmup_steps = "linear", 2  # `_args` fixes a constant schedule
    trainer = DPOTrainer(
        model=tb.model, args=args, train_dataset=tb.preference_dataset(8, seed=21), processing_class=tb.tokenizer,
        peft_config=AlignerConfig(num_tokens=2),
    )  # fmt: skip
    add_default_callbacks(trainer, plots=False)
    trainer.train()
    (check,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoOpWarningCallback)]
    assert (
        len(check.warned) == 1
        and "no trainable parameter changed in the first 1 step(s) (loss 0.6931" in check.warned[0]
    )
