"""Resume equivalence: N steps uninterrupted vs. stop at a checkpoint and ``resume_from_checkpoint``.

The resumed run always starts from a model whose trainable state differs from the checkpoint's (different mask
deltas / a differently seeded adapter), so a checkpoint that is silently not loaded cannot pass. Final trainable
state, the losses logged after the checkpoint and the frozen base are compared **bitwise** (fp32 on CPU: the
resumed run replays the same data order, retain draws and optimizer state, so no tolerance is needed).

Covered here: ``NPOTrainer`` (token level, token weights, neuron mask with the deltas-off reference, retain set),
Aligner with ``trl.SFTTrainer`` and ``trl.DPOTrainer`` + ``peft.get_peft_model(model, AlignerConfig(...))``, and
``AMAMergeCallback``. Elsewhere:
MaskedDPO (``test_masked_dpo.py``), NPO with precomputed reference (``test_npo.py``), MaskAccumulation
(``test_mask_accumulation.py``), FeedbackConditioned (``test_feedback_conditioned.py``), the pipeline
(``test_pipeline.py``).
"""

import shutil

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_align import testbed
from hf_align.peft_tuners import AlignerConfig
from hf_align.testbed import quiet_training_args


STEPS, SAVE_AT = 4, 2


def _common(output_dir, **overrides):
    kwargs = quiet_training_args(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_AT,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",  # the scheduler state must be restored too
        warmup_steps=1,
        logging_steps=1,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


class StepCounter(TrainerCallback):
    """How many optimizer steps this run itself took (the log history is restored from the checkpoint)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def _assert_resumed_like_full(full, resumed, full_state, resumed_state):
    assert resumed.state.global_step == full.state.global_step == STEPS
    counted = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, StepCounter)]
    assert counted[0].steps == list(range(SAVE_AT + 1, STEPS + 1))  # really resumed at SAVE_AT
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    for step in range(1, STEPS + 1):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
    assert set(full_state) == set(resumed_state)
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------------------------------------------
# NPO: token-level, token weights, neuron mask (checkpoint keeps the deltas), retain set


def _forget_with_weights(tokenizer, n):
    from hf_align.token_weights import weights_from_char_spans

    def add(example):
        start = example["completion"].index(" ugh")
        spans = [(start, start + 4)]
        weights = weights_from_char_spans(tokenizer, example["prompt"], example["completion"], spans, outside=0.1)
        return {"completion_weights": weights}

    return testbed.forget_dataset(n, seed=0).map(add)


def test_npo_with_mask_weights_and_retain_resumes_bitwise(tmp_path):
    from hf_align.masks import NeuronMask
    from hf_align.sparse_update import iter_deltas, merged_state_dict
    from hf_align.trainers import NPOConfig, NPOTrainer

    tok = testbed.load_tokenizer()
    forget, retain = _forget_with_weights(tok, 12), testbed.retain_dataset(8, seed=1)
    mask = NeuronMask.random(testbed.load_random_tiny("llama", hidden_size=32, num_layers=2), 0.25, "row", seed=3)

    def trainer(output_dir):
        model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
        args = NPOConfig(**_common(output_dir, npo_level="token", retain_batch_size=2, beta=0.1))
        return NPOTrainer(
            model,
            args=args,
            train_dataset=forget,
            processing_class=tok,
            retain_dataset=retain,
            neuron_mask=mask,
            callbacks=[StepCounter()],
        )

    full = trainer(tmp_path / "full")
    assert full._ref_mode == "deltas_off"
    full.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{SAVE_AT}"
    shutil.copytree(tmp_path / "full" / f"checkpoint-{SAVE_AT}", checkpoint)

    resumed = trainer(tmp_path / "resumed")
    with torch.no_grad():  # start from other deltas: a checkpoint that is not loaded must show
        for delta in iter_deltas(resumed.model):
            for p in delta.parameters():
                p.add_(0.5)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    full_state = merged_state_dict(full.accelerator.unwrap_model(full.model))
    resumed_state = merged_state_dict(resumed.accelerator.unwrap_model(resumed.model))
    _assert_resumed_like_full(full, resumed, full_state, resumed_state)
    init = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2).state_dict()
    assert any(not torch.equal(full_state[n], init[n]) for n in mask.masks)  # it trained


# --------------------------------------------------------------------------------------------------------------
# Aligner + trl.SFTTrainer


def _aligner_model(seed):
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    torch.manual_seed(seed)
    return get_peft_model(model, AlignerConfig(num_tokens=2, start_layer=1, gate_init=0.1))


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "aligner_" in n}


def test_aligner_sft_resumes_bitwise(tmp_path):
    tok = testbed.load_tokenizer()
    data = testbed.sft_dataset(12, seed=5)

    def trainer(output_dir, seed):
        args = SFTConfig(**_common(output_dir, max_length=32, weight_decay=0.02))
        return SFTTrainer(
            model=_aligner_model(seed), args=args, train_dataset=data, processing_class=tok, callbacks=[StepCounter()]
        )

    full = trainer(tmp_path / "full", seed=0)
    initial = _adapter_state(full.model)
    assert initial and all(not p.requires_grad for n, p in full.model.named_parameters() if "aligner_" not in n)
    full.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{SAVE_AT}"
    shutil.copytree(tmp_path / "full" / f"checkpoint-{SAVE_AT}", checkpoint)
    assert (checkpoint / "adapter_model.safetensors").exists()

    resumed = trainer(tmp_path / "resumed", seed=1)  # other global tokens: the checkpoint must overwrite them
    assert any(not torch.equal(v, initial[n]) for n, v in _adapter_state(resumed.model).items())
    resumed.train(resume_from_checkpoint=str(checkpoint))

    full_state = _adapter_state(full.model)
    _assert_resumed_like_full(full, resumed, full_state, _adapter_state(resumed.model))
    assert any(not torch.equal(full_state[n], initial[n]) for n in full_state)  # it trained
    base = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2).state_dict()
    frozen = {
        n.replace(".base_layer.", "."): v
        for n, v in resumed.model.get_base_model().state_dict().items()
        if "aligner_" not in n
    }
    assert set(frozen) == set(base)
    for name, value in frozen.items():  # the base weights are untouched
        assert torch.equal(value, base[name]), name


def test_aligner_resume_from_a_checkpoint_without_adapter_fails_loudly(tmp_path):
    """A checkpoint missing its adapter weights must not resume as if nothing happened.

    (A checkpoint missing ``optimizer.pt`` resumes silently with a fresh optimizer: that is transformers'
    ``Trainer`` behaviour, not hf-align's, so it is not asserted here.)
    """
    tok = testbed.load_tokenizer()
    data = testbed.sft_dataset(8, seed=5)
    args = SFTConfig(**_common(tmp_path / "a", max_length=32, max_steps=2))
    SFTTrainer(model=_aligner_model(0), args=args, train_dataset=data, processing_class=tok).train()
    checkpoint = tmp_path / "a" / f"checkpoint-{SAVE_AT}"
    (checkpoint / "adapter_model.safetensors").unlink()
    args = SFTConfig(**_common(tmp_path / "b", max_length=32))
    trainer = SFTTrainer(model=_aligner_model(1), args=args, train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_aligner_dpo_resumes_bitwise(tmp_path):
    """Aligner + trl.DPOTrainer, reference = adapter disabled: the resumed run ends bitwise like the full one."""
    from trl import DPOConfig, DPOTrainer

    tok = testbed.load_tokenizer()
    data = testbed.preference_dataset(12, seed=5)

    def trainer(output_dir, seed):
        args = DPOConfig(**_common(output_dir, max_length=32, gradient_checkpointing=False, beta=0.1))
        return DPOTrainer(
            model=_aligner_model(seed), args=args, train_dataset=data, processing_class=tok, callbacks=[StepCounter()]
        )

    full = trainer(tmp_path / "full", seed=0)
    initial = _adapter_state(full.model)
    full.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{SAVE_AT}"
    shutil.copytree(tmp_path / "full" / f"checkpoint-{SAVE_AT}", checkpoint)
    resumed = trainer(tmp_path / "resumed", seed=1)
    assert any(not torch.equal(v, initial[n]) for n, v in _adapter_state(resumed.model).items())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    full_state = _adapter_state(full.model)
    _assert_resumed_like_full(full, resumed, full_state, _adapter_state(resumed.model))
    assert any(not torch.equal(full_state[n], initial[n]) for n in full_state)


def test_ama_merge_callback_output_is_the_same_after_a_resume(tmp_path):
    """AMAMergeCallback keeps no state of its own: the merged model at the end of a resumed run equals the
    uninterrupted run's, tensor for tensor, and the checkpoint merges are written in both runs."""
    from safetensors.torch import load_file

    from hf_align.callbacks import AMAMergeCallback

    tok = testbed.load_tokenizer()
    data = testbed.sft_dataset(12, seed=5)
    base_dir = tmp_path / "base"
    testbed.load_random_tiny("llama", hidden_size=32, num_layers=2).save_pretrained(base_dir)

    def trainer(output_dir, seed):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        if seed:  # a different start: the checkpoint must overwrite it
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
        args = SFTConfig(**_common(output_dir, max_length=32, gradient_checkpointing=False))
        callbacks = [StepCounter(), AMAMergeCallback(base_model=base_dir, alpha=0.3, merge_on="both")]
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks)

    full = trainer(tmp_path / "full", seed=0)
    full.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{SAVE_AT}"
    shutil.copytree(tmp_path / "full" / f"checkpoint-{SAVE_AT}", checkpoint)
    resumed = trainer(tmp_path / "resumed", seed=1)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    merged = [load_file(next((tmp_path / run / "ama_merged").glob("*.safetensors"))) for run in ("full", "resumed")]
    assert merged[0].keys() == merged[1].keys()
    for name in merged[0]:
        assert torch.equal(merged[0][name], merged[1][name]), name
    assert (tmp_path / "resumed" / f"checkpoint-{STEPS}" / "ama_merged").is_dir()


def test_cli_resume_true_skips_a_checkpoint_killed_mid_save(tmp_path):
    """A kill while the Trainer writes checkpoint-4 leaves it without trainer_state.json (written last);
    `--resume_from_checkpoint true` must resume from checkpoint-2, say which one it skipped, and finish."""
    import json

    from hf_align.cli import main

    out = tmp_path / "out"
    argv = [
        "aligner-sft", "--no_launch", "--model_name_or_path", "testbed", "--dataset_name", "testbed:sft",
        "--output_dir", str(out), "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE_AT),
        "--per_device_train_batch_size", "2", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
        "--logging_steps", "1", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    (out / f"checkpoint-{STEPS}" / "trainer_state.json").unlink()  # the kill
    state = out / f"checkpoint-{SAVE_AT}" / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["log_history"].append({"step": SAVE_AT, "resumed_from_here": 1})  # only a real resume carries it over
    state.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=f"checkpoint-{STEPS}.*trainer_state.json"):
        assert main([*argv, "--resume_from_checkpoint", "true"]) == 0
    final = json.loads((out / "trainer_state.json").read_text())
    assert final["global_step"] == STEPS
    assert any(entry.get("resumed_from_here") for entry in final["log_history"])
