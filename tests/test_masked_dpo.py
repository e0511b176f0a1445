"""MaskedDPOTrainer: exact vs trl.DPOTrainer in the degenerate cases, masks, token weights, save/resume."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from trl import DPOConfig, DPOTrainer

from hf_align import testbed
from hf_align.testbed import quiet_training_args
from hf_align.trainers.masked_dpo import MaskedDPOConfig, MaskedDPOTrainer
from hf_align.trainers.registry import TRAINERS


MASKED_TRAINERS = [spec for spec in TRAINERS.values() if spec.masked]  # each takes preference pairs


STEPS = 3


def _args(tmp_path, cls=MaskedDPOConfig, **overrides):
    kwargs = quiet_training_args(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        seed=0,
        beta=0.1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=False,
        bf16=False,  # fp32 on CPU: the exactness tests compare at 1e-6
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


# ---------------------------------------------------------------------------------------------------------------
# Token weights and dynamic selection, against formulas written out here


def _trainer(tmp_path, tokenizer, dataset, model=None, ref_model="copy", **overrides):
    model = model if model is not None else _model()
    return MaskedDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model) if ref_model == "copy" else ref_model,
        args=_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _token_logps(model, batch):
    """Per-token log-probs from plain logits (independent of TRL's fused head), 0 outside the completion."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps * batch["completion_mask"][:, 1:]


def _sigmoid_loss(beta, pol, ref, weights):
    sums = ((pol - ref) * weights).sum(1)
    chosen, rejected = sums.chunk(2)
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()


def _random_weights(example):
    g = torch.Generator().manual_seed(len(example["chosen"]) * 31 + len(example["rejected"]))
    return {
        "chosen_weights": torch.rand(len(example["chosen"]) + 1, generator=g).tolist(),  # + EOS
        "rejected_weights": torch.rand(len(example["rejected"]), generator=g).tolist(),  # EOS omitted -> 1.0
    }


def _perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def _expected_token_weights(tokenizer, raw_rows, tokenized_rows, width):
    """Token weights built from the dataset rows and the tokenizer alone (not from the collator under test).

    Row ``i`` of the chosen half and ``B + i`` of the rejected half weigh the log-prob of ``input_ids[., j + 1]`` at
    column ``j``: completion token ``k`` sits at position ``len(prompt) + k``, so its weight goes to column
    ``len(prompt) + k - 1``. The chosen weights list its EOS; the rejected ones omit it (``eos_token_weight`` = 1).
    """
    expected = torch.zeros(2 * len(raw_rows), width)
    for side, offset in (("chosen", 0), ("rejected", len(raw_rows))):
        for i, (raw, tokenized) in enumerate(zip(raw_rows, tokenized_rows, strict=True)):
            completion = tokenizer(raw[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert tokenized[f"{side}_ids"] == completion
            weights = list(raw[f"{side}_weights"]) + ([1.0] if side == "rejected" else [])
            assert len(weights) == len(completion)
            start = len(tokenized["prompt_ids"]) - 1
            expected[offset + i, start : start + len(weights)] = torch.tensor(weights)
    return expected


def test_token_weights_loss_equals_formula(tmp_path, tokenizer):
    data = _data(8).map(_random_weights)
    model = _model()
    ref = _perturbed(model)
    trainer = _trainer(tmp_path, tokenizer, data, model=model, ref_model=ref)
    batch = _batch(trainer)
    weights = _expected_token_weights(
        tokenizer,
        [data[i] for i in range(4)],
        [trainer.train_dataset[i] for i in range(4)],
        batch["input_ids"].size(1) - 1,
    )
    torch.testing.assert_close(batch["token_weights"], weights, atol=0, rtol=0)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    expected = _sigmoid_loss(0.1, _token_logps(model, batch), _token_logps(ref, batch), weights)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    unweighted = _sigmoid_loss(
        0.1, _token_logps(model, batch), _token_logps(ref, batch), batch["completion_mask"][:, 1:]
    )
    assert abs(unweighted.item() - expected.item()) > 1e-4  # the weights matter


def test_weights_all_one_equal_unweighted_training(tmp_path, tokenizer):
    data = _data(8)
    ones = data.map(
        lambda ex: {"chosen_weights": [1.0] * (len(ex["chosen"]) + 1), "rejected_weights": [1.0] * len(ex["rejected"])}
    )
    plain = _train(MaskedDPOTrainer, _args(tmp_path, max_steps=2), tokenizer, data)
    weighted = _train(MaskedDPOTrainer, _args(tmp_path, max_steps=2), tokenizer, ones)
    assert _losses(weighted) == pytest.approx(_losses(plain), abs=1e-6)
    for a, b in zip(plain.model.parameters(), weighted.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("last_weight", [0.0, 1.0])
def test_zero_weight_token_changes_nothing(tmp_path, tokenizer, last_weight):
    """Changing the id of the last rejected token (its log-prob; nothing later conditions on it) is invisible at w=0."""
    data = _data(8).map(lambda ex: {"rejected_weights": [1.0] * len(ex["rejected"]) + [last_weight]})
    model = _model()
    trainer = _trainer(tmp_path, tokenizer, data, model=model, ref_model=_perturbed(model))
    batch = _batch(trainer)
    changed = {k: v.clone() for k, v in batch.items()}
    half = batch["input_ids"].size(0) // 2
    for i in range(half, 2 * half):
        last = int(batch["completion_mask"][i].nonzero().max())
        changed["input_ids"][i, last] = (batch["input_ids"][i, last] + 7) % len(tokenizer)

    def loss_and_grads(b):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, b)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainer.model.parameters()]

    loss_a, grads_a = loss_and_grads(dict(batch))
    loss_b, grads_b = loss_and_grads(changed)
    if last_weight == 0.0:
        assert loss_a == loss_b
        for a, b in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    else:
        assert abs(loss_a - loss_b) > 1e-5  # control: the construction does perturb a counted token


def _hand_selection(pol, ref, mask, ratio):
    selected = torch.zeros_like(pol)
    for i in range(pol.size(0)):
        idx = [j for j in range(pol.size(1)) if mask[i, j]]
        values = sorted(float(pol[i, j] - ref[i, j]) for j in idx)
        k = max(1, math.floor(ratio * len(idx)))
        for j in idx:
            if float(pol[i, j] - ref[i, j]) <= values[k - 1]:
                selected[i, j] = 1.0
    return selected


def test_rejected_token_ratio_equals_hand_computation(tmp_path, tokenizer):
    data = _data(8)
    model = _model()
    ref = _perturbed(model, scale=0.1)
    trainer = _trainer(tmp_path, tokenizer, data, model=model, ref_model=ref, rejected_token_ratio=0.5)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    pol, refl = _token_logps(model, batch), _token_logps(ref, batch)
    mask = batch["completion_mask"][:, 1:]
    half = pol.size(0) // 2
    weights = mask.clone().float()
    weights[half:] = _hand_selection(pol[half:], refl[half:], mask[half:], 0.5)
    assert 0 < weights[half:].sum() < mask[half:].sum()  # a real selection happened
    expected = _sigmoid_loss(0.1, pol, refl, weights)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["logps/rejected"][-1] == pytest.approx((pol[half:] * weights[half:]).sum(1).mean().item(), abs=1e-5)


def test_precomputed_reference_is_weighted(tmp_path, tokenizer):
    data = _data(8).map(_random_weights)
    model = _model()
    live = _trainer(tmp_path, tokenizer, data, model=model)
    pre = _trainer(
        tmp_path, tokenizer, data, model=copy.deepcopy(model), ref_model=None, precompute_ref_log_probs=True
    )
    batch_live, batch_pre = _batch(live), _batch(pre)
    assert "ref_chosen_logps" in batch_pre
    labels = batch_live["input_ids"].masked_fill(batch_live["completion_mask"] == 0, -100)
    with torch.no_grad():  # TRL's fused per-token log-probs (the wrapper is inactive outside compute_loss)
        kwargs = {k: batch_live[k] for k in ("input_ids", "attention_mask")}
        per_token = live.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs
    ref_sums = (per_token * batch_live["token_weights"]).sum(1)
    torch.testing.assert_close(
        torch.cat([batch_pre["ref_chosen_logps"], batch_pre["ref_rejected_logps"]]), ref_sums, atol=1e-5, rtol=0
    )
    assert live.compute_loss(live.model, dict(batch_live)).item() == pytest.approx(
        pre.compute_loss(pre.model, dict(batch_pre)).item(), abs=1e-6
    )


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("rejected_weights", lambda ex: [1.0] * (len(ex["rejected"]) + 3), "rejected_weights.*row 0"),
        ("chosen_weights", lambda ex: [-1.0] * len(ex["chosen"]), "chosen_weights.*row 0.*non-negative"),
        ("chosen_weights", lambda ex: [float("nan")] * len(ex["chosen"]), "chosen_weights.*row 0"),
    ],
)
def test_bad_weights_fail_before_training(tmp_path, tokenizer, column, values, message):
    data = _data(4).map(lambda ex: {column: values(ex)})
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, tokenizer, data)


def test_weights_without_text_column_fail(tmp_path, tokenizer):
    data = _data(4).map(lambda ex: {"completion_weights": [1.0]})
    with pytest.raises(ValueError, match="completion_weights"):
        _trainer(tmp_path, tokenizer, data)


def test_conversational_data_with_weights_trains(tmp_path, tokenizer):
    from hf_align.token_weights import char_span_weights

    data = testbed.preference_dataset(8, seed=0, conversational=True)
    data = data.map(char_span_weights(tokenizer, "rejected_wrong_positions", positions=True))
    trainer = _train(MaskedDPOTrainer, _args(tmp_path, max_steps=2), tokenizer, data)
    assert all(math.isfinite(x) for x in _losses(trainer)) and len(_losses(trainer)) == 2
    row = trainer.train_dataset[1]
    assert len(row["rejected_weights"]) == len(row["rejected_ids"])


# ---------------------------------------------------------------------------------------------------------------
# Neuron masks


def _mask_api():
    from hf_align import sparse_update
    from hf_align.masks import NeuronMask

    return NeuronMask, sparse_update


def _effective(model, sparse):
    """Plain parameters of a model with deltas (merged on a copy) or without."""
    model = copy.deepcopy(model)
    if sparse.has_deltas(model):
        model = sparse.merge_deltas(model)
    return _params(model)


def test_full_mask_equals_no_mask(tmp_path, tokenizer):
    NeuronMask, sparse = _mask_api()
    data = _data(8)
    model = _model()
    plain = _train(MaskedDPOTrainer, _args(tmp_path), tokenizer, data, model=copy.deepcopy(model))
    full = NeuronMask.full(model, "element")
    masked = _train(MaskedDPOTrainer, _args(tmp_path), tokenizer, data, model=model, ref_model=None, neuron_mask=full)
    assert _losses(masked) == pytest.approx(_losses(plain), abs=1e-5)
    after = _effective(masked.model, sparse)
    for name, value in _params(plain.model).items():
        torch.testing.assert_close(after[name], value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_sparse_mask_leaves_unselected_bit_identical(tmp_path, tokenizer, granularity):
    NeuronMask, sparse = _mask_api()
    model = _model()
    start = _params(model)
    mask = NeuronMask.random(model, 0.1, granularity, seed=0)
    trainer = _train(
        MaskedDPOTrainer,
        _args(tmp_path, weight_decay=0.1),
        tokenizer,
        _data(8),
        model=model,
        ref_model=None,
        neuron_mask=mask,
    )
    assert trainer.trainable_fraction < 0.2
    after = _effective(trainer.model, sparse)
    changed = 0
    for name, value in start.items():
        selected = mask.masks.get(name)
        if selected is None:
            assert torch.equal(after[name], value), name
            continue
        keep = ~(selected if selected.shape == value.shape else selected[:, None].expand_as(value))
        assert torch.equal(after[name][keep], value[keep]), name
        changed += int((after[name] != value).sum())
    assert changed > 0


def test_step0_update_equals_allo_masked_adamw(tmp_path, tokenizer):
    """ALLO's masked AdamW applied to TRL's full step-0 gradient gives our selected entries' update.

    Both gradients are taken inside ``train()`` (TRL's fused log-prob path). Adam's first step is ``lr·sign(g)``, so
    entries whose gradient is at float-noise level (0 < |g| < 1e-7: the two runs' references differ by rounding) have
    no defined sign and are left out; they are under 1% of the selection.
    """
    from transformers import TrainerCallback

    NeuronMask, sparse = _mask_api()
    data = _data(4)  # one batch of 4 = the whole dataset, so both sides see the same pairs
    model = _model()
    mask = NeuronMask.random(model, 0.1, "element", seed=0)
    hp = dict(max_steps=1, learning_rate=1e-3, adam_epsilon=1e-12, weight_decay=0.0)
    grads = {}

    class CaptureGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    full = copy.deepcopy(model)
    start = _params(model)
    _train(
        DPOTrainer,
        _args(tmp_path / "trl", cls=DPOConfig, **hp),
        tokenizer,
        data,
        model=full,
        ref_model=copy.deepcopy(model),
        callbacks=[CaptureGradients()],
    )
    replay = {n: torch.nn.Parameter(start[n].clone()) for n in mask.masks}
    for name, param in replay.items():
        param.grad = grads[name]
    optimizer = sparse.MaskedAdamW(
        [{"params": [replay[n]], "mask": m} for n, m in mask.masks.items()], lr=1e-3, eps=1e-12, weight_decay=0.0
    )
    optimizer.step()
    ours = _train(
        MaskedDPOTrainer, _args(tmp_path, **hp), tokenizer, data, model=model, ref_model=None, neuron_mask=mask
    )
    after = _effective(ours.model, sparse)
    compared = skipped = 0
    for name, selected in mask.masks.items():
        defined = selected & ((grads[name] == 0) | (grads[name].abs() >= 1e-7))
        skipped += int((selected & ~defined).sum())
        compared += int(defined.sum())
        torch.testing.assert_close(
            after[name][defined], replay[name].detach()[defined], atol=1e-6, rtol=1e-4, msg=name
        )
        assert torch.equal(after[name][~selected], start[name][~selected]), name
    assert compared > 0 and skipped < 0.01 * (compared + skipped), (compared, skipped)


@pytest.mark.parametrize("save_merged", [True, False])
def test_save_reload_reproduces_logits(tmp_path, tokenizer, save_merged):
    NeuronMask, sparse = _mask_api()
    from transformers import AutoModelForCausalLM

    model = _model()
    base = copy.deepcopy(model)
    mask = NeuronMask.random(model, 0.2, "row", seed=0)
    trainer = _train(
        MaskedDPOTrainer,
        _args(tmp_path, save_merged=save_merged, max_steps=2),
        tokenizer,
        _data(8),
        model=model,
        ref_model=None,
        neuron_mask=mask,
    )
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]])
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        if save_merged:
            reloaded = AutoModelForCausalLM.from_pretrained(str(out))
        else:
            reloaded = sparse.attach_deltas(base, mask) or base
            sparse.load_deltas(base, str(out))
            reloaded = base
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path, tokenizer):
    NeuronMask, sparse = _mask_api()
    model = _model()
    mask = NeuronMask.random(model, 0.2, "row", seed=0)
    hp = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = _train(
        MaskedDPOTrainer,
        _args(tmp_path / "a", **hp),
        tokenizer,
        _data(16),
        model=copy.deepcopy(model),
        ref_model=None,
        neuron_mask=mask,
    )
    resumed_trainer = MaskedDPOTrainer(
        model=copy.deepcopy(model),
        args=_args(tmp_path / "b", **hp),
        train_dataset=_data(16),
        processing_class=tokenizer,
        neuron_mask=mask,
    )
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    a, b = _effective(straight.model, sparse), _effective(resumed_trainer.model, sparse)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    # the checkpoint itself is a normal transformers checkpoint (deltas merged)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "out" / "checkpoint-2"))


def test_masked_dpo_raises_testbed_reward(tmp_path):
    """A random 10% of decoder rows, 60 steps: sampled reward goes up (full DPO gets ~+0.11 in the same budget)."""
    NeuronMask, _ = _mask_api()
    tb = testbed.load()
    before = tb.mean_reward(num_prompts=256)["mean_reward"]
    mask = NeuronMask.random(tb.model, 0.1, "row", seed=0)
    args = _args(tmp_path, max_steps=60, per_device_train_batch_size=16, learning_rate=2e-3, logging_steps=20)
    trainer = MaskedDPOTrainer(
        model=tb.model,
        args=args,
        train_dataset=tb.preference_dataset(512),
        processing_class=tb.tokenizer,
        neuron_mask=mask,
    )
    trainer.train()
    after = tb.mean_reward(trainer.model, num_prompts=256)["mean_reward"]
    assert after > before + 0.02, (before, after)


def test_4bit_base_trains_only_deltas_and_saves_a_full_precision_merged_model(tmp_path):
    """QLoRA-style: a bitsandbytes 4-bit base (run for real on CPU) with row deltas in the compute dtype; the saved
    model is an ordinary full-precision checkpoint whose logits equal the trained 4-bit model's."""
    import bitsandbytes  # noqa: F401  (a dev dependency: an import error must fail, not skip)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    NeuronMask, sparse = _mask_api()
    tb = testbed.load()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(testbed.MODEL_DIR, quantization_config=quantization, device_map="cpu")
    ids = torch.tensor([tb.tokenizer("12+34=")["input_ids"]])
    model.train()  # an eval-mode forward would let bitsandbytes repack for its (different) CPU inference kernel
    with torch.no_grad():
        start = model(input_ids=ids).logits
    mask = NeuronMask.random(model, 0.1, "row", seed=0)
    trainer = _train(
        MaskedDPOTrainer, _args(tmp_path, max_steps=3), tb.tokenizer, _data(8), model=model, ref_model=None,
        neuron_mask=mask,
    )  # fmt: skip
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == {
        n for n, p in trainer.model.named_parameters() if "delta" in n
    }
    # TRL casts a quantized model's trainable parameters to bf16 (QLoRA); deltas keep the compute dtype
    assert {h.delta.dtype for h in sparse.iter_deltas(trainer.model)} == {torch.float32}
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        with sparse.deltas_disabled(trainer.model):
            torch.testing.assert_close(trainer.model(input_ids=ids).logits, start, atol=0, rtol=0)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-4, rtol=0)
    assert (trained - start).abs().max() > 1e-4


def test_fp32_deltas_on_a_bf16_base_keep_updates_bf16_would_round_away(tmp_path):
    """neuron_delta_dtype='float32': the deltas and their Adam moments are fp32 on a bf16 model; the merged
    checkpoint is bf16 again (the base dtype). Updates of lr 1e-4 on deltas that already hold 1.0 are below bf16's
    resolution there (2^-7 at 1.0): bf16 deltas stay put, fp32 ones move."""
    NeuronMask, sparse = _mask_api()
    tb = testbed.load(dtype=torch.bfloat16)
    mask = NeuronMask.random(tb.model, 0.1, "row", seed=0)
    moved = {}
    for dtype in ("float32", "auto"):
        model = copy.deepcopy(tb.model)
        args = _args(tmp_path / dtype, max_steps=3, learning_rate=1e-4, neuron_delta_dtype=dtype, bf16=False)
        trainer = MaskedDPOTrainer(
            model=model, args=args, train_dataset=_data(12), processing_class=tb.tokenizer, neuron_mask=mask
        )
        holders = list(sparse.iter_deltas(trainer.model))
        assert {h.delta.dtype for h in holders} == {torch.float32 if dtype == "float32" else torch.bfloat16}
        with torch.no_grad():
            for holder in holders:
                holder.delta.fill_(1.0)
        before = [h.delta.detach().float().clone() for h in holders]
        trainer.train()
        moved[dtype] = max((h.delta.float() - b).abs().max().item() for h, b in zip(holders, before))
        if dtype == "float32":
            trainer.save_model(str(tmp_path / "final"))
            weights = load_file(str(tmp_path / "final" / "model.safetensors"))
            assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert moved["float32"] > 1e-4  # ~3 Adam steps of 1e-4
    assert moved["auto"] == 0.0  # bf16: 1.0 + 1e-4 rounds back to 1.0


@pytest.mark.parametrize("spec", MASKED_TRAINERS, ids=[spec.name for spec in MASKED_TRAINERS])
def test_a_neuron_mask_and_a_peft_adapter_are_refused_together(tmp_path, spec):
    from peft import LoraConfig

    NeuronMask, _ = _mask_api()
    tb = testbed.load()
    mask = NeuronMask.random(tb.model, 0.1, "row", seed=0)
    args = spec.config_class()(**quiet_training_args(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="neuron mask and a PEFT adapter"):
        spec.trainer_class()(
            copy.deepcopy(tb.model), args=args, train_dataset=_data(4), processing_class=tb.tokenizer,
            neuron_mask=mask, peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )  # fmt: skip


def test_sampled_gradient_density_reaches_the_deltas(tmp_path, tokenizer):
    """neuron_sampled_gradient_density: the element-masked Linear layers at most that dense take the sampled weight
    gradient (the tied embedding does not) and train; the gradient's exactness is tested in test_sparse_update.py
    (trained deltas are no test of it: Adam's first step is sign(g), which flips where g is zero up to rounding)."""
    NeuronMask, sparse = _mask_api()
    model = _model()
    mask = NeuronMask.random(model, 0.1, "element", seed=0)
    for density in (0.0, 0.5):
        args = _args(tmp_path / str(density), max_steps=2, learning_rate=1e-3, neuron_sampled_gradient_density=density)
        trainer = MaskedDPOTrainer(
            model=copy.deepcopy(model), args=args, train_dataset=_data(8), processing_class=tokenizer,
            neuron_mask=mask,
        )  # fmt: skip
        holders = list(sparse.iter_deltas(trainer.model))
        sampled = {h.param_name for h in holders if h.pattern is not None}
        linear = {h.param_name for h in holders if h.param_name.endswith("_proj.weight")}
        assert sampled == (linear if density else set()) and linear
    trainer.train()
    assert all(h.delta.isfinite().all() for h in holders) and any(h.delta.abs().max() > 0 for h in holders)
