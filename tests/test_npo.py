"""NPOTrainer: losses against formulas written out here, data formats, reference options, resume, testbed forgetting."""

import contextlib
import copy
import math

import pytest
import torch

from hf_align.losses import npo_sequence_loss, npo_token_loss, retain_kl, retain_nll, simnpo_loss
from hf_align.testbed import quiet_training_args


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


POLICY = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -4.0, 0.0, 0.0]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.7, 0.0], [-0.2, -3.0, 0.0, 0.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([[1.0, 0.5, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_sequence_loss_is_the_npo_formula(beta):
    loss, logratio = npo_sequence_loss(POLICY, REF, WEIGHTS, beta)
    for i in range(2):
        r = sum(WEIGHTS[i, t].item() * (POLICY[i, t].item() - REF[i, t].item()) for t in range(4))
        assert logratio[i].item() == pytest.approx(r)
        assert loss[i].item() == pytest.approx(-(2 / beta) * log_sigmoid(-beta * r))


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_token_loss_is_allos_formula(beta):
    total, count = 0.0, 0
    for i in range(2):
        for t in range(4):
            w = WEIGHTS[i, t].item()
            total += -w * log_sigmoid(-beta * (POLICY[i, t].item() - REF[i, t].item()))
            count += w != 0
    assert npo_token_loss(POLICY, REF, WEIGHTS, beta).item() == pytest.approx(total / count)


def test_unit_weights_are_plain_sequence_npo_and_init_loss_is_2ln2_over_beta():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    policy = POLICY[:1] * mask
    loss, _ = npo_sequence_loss(policy, REF[:1] * mask, mask, 0.5)
    r = (policy - REF[:1] * mask).sum().item()  # log πθ(y|x) − log π_ref(y|x)
    assert loss.item() == pytest.approx(-(2 / 0.5) * log_sigmoid(-0.5 * r))
    at_init, _ = npo_sequence_loss(policy, policy, mask, 0.5)
    assert at_init.item() == pytest.approx(2 * math.log(2) / 0.5)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_zero_weight_token_cannot_affect_loss_or_get_gradient(level):
    policy = POLICY.clone().requires_grad_(True)
    fn = (lambda p: npo_sequence_loss(p, REF, WEIGHTS, 0.1)[0].mean()) if level == "sequence" else None
    fn = fn or (lambda p: npo_token_loss(p, REF, WEIGHTS, 0.1))
    loss = fn(policy)
    loss.backward()
    assert policy.grad[0, 2] == 0 and policy.grad[1, 2] == 0
    changed = POLICY.clone()
    changed[0, 2] = -50.0
    assert fn(changed).item() == loss.item()


def test_simnpo_by_hand():
    beta, gamma = 2.5, 0.3
    loss = simnpo_loss(POLICY, WEIGHTS, beta, gamma)
    for i in range(2):
        length = WEIGHTS[i].sum().item()
        logp = sum(WEIGHTS[i, t].item() * POLICY[i, t].item() for t in range(4))  # log πθ(y|x), weighted
        assert loss[i].item() == pytest.approx(-(2 / beta) * log_sigmoid(-(beta / length) * logp - gamma))


def test_retain_terms_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    log_probs = torch.tensor([[-0.5, -1.5, -9.0]])
    assert retain_nll(log_probs, mask).item() == pytest.approx((0.5 + 1.5) / 2)
    policy = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    ref = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1))
    expected = 0.0
    for t in range(2):
        p_ref, p_pol = ref[0, t].softmax(-1), policy[0, t].softmax(-1)
        expected += sum(p_ref[v] * math.log(p_ref[v] / p_pol[v]) for v in range(5)).item()
    assert retain_kl(policy, ref, mask).item() == pytest.approx(expected / 2, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# The trainer


def _args(tmp_path, **kw):
    from hf_align.trainers import NPOConfig

    base = quiet_training_args(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        gradient_checkpointing=False,
        logging_steps=1,
    )
    base.update(kw)
    return NPOConfig(**base)


def _batch(trainer, n=4):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def _manual_token_logps(model, batch):
    """Independent per-token log-probs from full logits: (B, L-1), 0 outside the completion."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * (labels != -100)


@pytest.fixture(scope="module")
def testbed_model():
    from hf_align import testbed

    return testbed.load()


@pytest.mark.parametrize("conversational", [False, True])
def test_init_loss_is_2ln2_over_beta_on_the_real_model(tmp_path, testbed_model, conversational):
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    model = copy.deepcopy(testbed_model.model)
    trainer = NPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=_args(tmp_path, beta=0.25),
        train_dataset=testbed.forget_dataset(4, conversational=conversational),
        processing_class=testbed_model.tokenizer,
    )
    loss = trainer.compute_loss(trainer.model, _batch(trainer))
    assert loss.item() == pytest.approx(2 * math.log(2) / 0.25, abs=1e-5)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_trainer_loss_matches_formula_with_weights_from_preference_data(tmp_path, level):
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    tok = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = testbed.preference_dataset(4, seed=0)
    data = data.map(lambda ex: {"rejected_weights": [float(i % 2) for i in range(len(ex["rejected"]))]})
    trainer = NPOTrainer(
        model, ref_model=ref, args=_args(tmp_path, npo_level=level, beta=0.5), train_dataset=data, processing_class=tok
    )
    batch = _batch(trainer)
    weights = batch["token_weights"][:, 1:].clone()
    policy, reference = _manual_token_logps(model, batch), _manual_token_logps(ref, batch)
    # digits are single tokens, the EOS weight is eos_token_weight = 1
    row0 = [i for i, lab in enumerate(batch["labels"][0, 1:].tolist()) if lab != -100]
    assert weights[0, row0].tolist() == [float(i % 2) for i in range(len(row0) - 1)] + [1.0]
    if level == "sequence":
        expected = 0.0
        for i in range(4):
            r = float(((policy[i] - reference[i]) * weights[i]).sum())
            expected += -(2 / 0.5) * log_sigmoid(-0.5 * r) / 4
    else:
        terms = -weights * torch.nn.functional.logsigmoid(-0.5 * (policy - reference))
        expected = float(terms.sum() / (weights != 0).sum())
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_bad_weights_name_column_and_row(tmp_path):
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    data = testbed.forget_dataset(3).map(
        lambda ex, i: {"completion_weights": [1.0] * (1 if i == 2 else 3)}, with_indices=True
    )
    data = data.map(lambda ex: {"completion": "123"})
    with pytest.raises(ValueError, match=r"'completion_weights', row 2"):
        NPOTrainer(
            testbed.load_random_tiny("llama", hidden_size=32, num_layers=2),
            ref_model=testbed.load_random_tiny("llama", hidden_size=32, num_layers=2),
            args=_args(tmp_path),
            train_dataset=data,
            processing_class=testbed.load_tokenizer(),
        )


def test_precomputed_reference_equals_live_reference(tmp_path):
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    tok = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    data = testbed.forget_dataset(4)
    live = NPOTrainer(
        copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=_args(tmp_path),
        train_dataset=data,
        processing_class=tok,
    )
    pre = NPOTrainer(
        copy.deepcopy(model),
        args=_args(tmp_path, precompute_ref_log_probs=True),
        train_dataset=data,
        processing_class=tok,
    )
    assert pre._ref_mode == "none" and "ref_token_logps" in pre.train_dataset.column_names
    for trainer in (live, pre):
        with torch.no_grad():
            trainer.model.model.layers[0].mlp.down_proj.weight.mul_(1.3)
    a = live.compute_loss(live.model, _batch(live))
    b = pre.compute_loss(pre.model, _batch(pre))
    assert a.item() == pytest.approx(b.item(), rel=1e-5) and a.item() != pytest.approx(2 * math.log(2) / 0.1)


def test_precomputed_reference_uses_the_mixed_precision_of_the_live_one(tmp_path):
    """bf16 autocast (CPU): the live reference runs under accelerate's autocast, so the precompute must too (as DPO's
    ``compute_ref_log_probs``); without it the column differs from the live values by ~1e-3."""
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    tok = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    data = testbed.forget_dataset(4, seed=3)
    pre = NPOTrainer(
        copy.deepcopy(model),
        args=_args(tmp_path, bf16=True, precompute_ref_log_probs=True),
        train_dataset=data,
        processing_class=tok,
    )
    live = NPOTrainer(
        copy.deepcopy(model),
        ref_model=model,
        args=_args(tmp_path, bf16=True),
        train_dataset=data,
        processing_class=tok,
    )
    assert live.accelerator.mixed_precision == "bf16"
    batch = _batch(pre)
    column = batch["ref_token_logps"][:, 1:] * (batch["labels"][:, 1:] != -100)
    expected = live._reference_log_probs(batch)  # the prepared reference model: accelerate's autocast forward
    assert not torch.equal(expected, _manual_token_logps(model, batch))  # autocast is really on
    torch.testing.assert_close(column, expected.float(), rtol=0, atol=1e-6)


def test_model_card_cites_the_npo_paper(tmp_path):
    from hf_align import testbed
    from hf_align.hub import CITATIONS
    from hf_align.trainers import NPOTrainer

    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    trainer = NPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=_args(tmp_path),
        train_dataset=testbed.forget_dataset(4),
        processing_class=testbed.load_tokenizer(),
    )
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "2404.05868" in card and CITATIONS["npo"].splitlines()[1].strip() in card and "@article{zhang2024npo" in card
    )


def test_fsdp_precompute_uses_a_loaded_copy_then_drops_it(tmp_path, testbed_model):
    """As DPOTrainer: FSDP shards the policy only in ``train``, so the precompute runs on a copy loaded from the
    policy's path, freed afterwards. FSDP itself needs GPUs; here only the flag is set and the copy is not sharded."""
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    loaded = []

    class FSDPFlagged(NPOTrainer):
        def _choose_reference(self, ref_model):
            self.is_fsdp_enabled = True
            try:
                return super()._choose_reference(ref_model)
            finally:
                self.is_fsdp_enabled = False

        def _prepare_ref_model(self, ref_model):
            loaded.append(ref_model)
            self.is_fsdp_enabled = False  # no process group here: place it as without FSDP
            return super()._prepare_ref_model(ref_model)

    kwargs = dict(train_dataset=testbed.forget_dataset(6), processing_class=testbed_model.tokenizer)
    args = _args(tmp_path, precompute_ref_log_probs=True)
    fsdp = FSDPFlagged(copy.deepcopy(testbed_model.model), args=args, **kwargs)
    plain = NPOTrainer(copy.deepcopy(testbed_model.model), args=args, **kwargs)
    assert len(loaded) == 1 and loaded[0] is not fsdp.model
    assert fsdp._ref_mode == plain._ref_mode == "none" and fsdp.ref_model is None
    assert fsdp.train_dataset["ref_token_logps"][:] == plain.train_dataset["ref_token_logps"][:]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    tok = testbed.load_tokenizer()
    base = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    forget, retain = testbed.forget_dataset(16), testbed.retain_dataset(8)

    def run(out, resume=None, max_steps=4):
        args = _args(
            tmp_path, output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=2,
            per_device_train_batch_size=2, retain_batch_size=3, precompute_ref_log_probs=True,
        )  # fmt: skip
        trainer = NPOTrainer(
            copy.deepcopy(base), args=args, train_dataset=forget, processing_class=tok, retain_dataset=retain
        )
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)


def test_npo_forgets_the_marker_and_keeps_retain_nll_on_the_testbed(tmp_path, testbed_model):
    """NPO on the ' ugh' tokens of the forget set (+ NLL retain term): p(' ugh') drops, retain NLL rises < 10 %."""
    from hf_align import testbed
    from hf_align.token_weights import weights_from_char_spans
    from hf_align.trainers import NPOTrainer

    tok = testbed_model.tokenizer
    model = copy.deepcopy(testbed_model.model)

    def marker_logp_and_retain_nll(m):
        marker, nll, count = [], 0.0, 0
        for ex in testbed.forget_dataset(16, seed=11):
            answer = ex["completion"][: ex["completion"].index(" ugh")]
            ctx = tok(ex["prompt"] + answer)["input_ids"]
            ids = torch.tensor([tok(ex["prompt"] + ex["completion"])["input_ids"]])
            with torch.no_grad():
                lp = m(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            marker.append(lp[len(ctx) - 1 :].sum().item())
        for ex in testbed.retain_dataset(16, seed=12):
            p = tok(ex["prompt"])["input_ids"]
            ids = torch.tensor([tok(ex["prompt"] + ex["completion"] + tok.eos_token)["input_ids"]])
            with torch.no_grad():
                lp = m(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            nll -= lp[len(p) - 1 :].sum().item()
            count += ids.size(1) - len(p)
        return sum(marker) / len(marker), nll / count

    marker0, retain0 = marker_logp_and_retain_nll(model)
    forget = testbed.forget_dataset(48).map(
        lambda ex: {
            "completion_weights": weights_from_char_spans(
                tok,
                ex["prompt"],
                ex["completion"],
                [(ex["completion"].index(" ugh"), len(ex["completion"]))],
                special=0.0,
            )
        }
    )
    args = _args(
        tmp_path, max_steps=8, per_device_train_batch_size=8, learning_rate=2e-3, retain_weight=2.0,
        precompute_ref_log_probs=True,
    )  # fmt: skip
    trainer = NPOTrainer(
        model, args=args, train_dataset=forget, processing_class=tok, retain_dataset=testbed.retain_dataset(64)
    )
    trainer.train()
    marker1, retain1 = marker_logp_and_retain_nll(trainer.model)
    assert marker1 < marker0 - 1.5, (marker0, marker1)  # p(' ugh') shrinks by more than e^1.5 ≈ 4.5×
    assert retain1 < 1.10 * retain0, (retain0, retain1)


# ------------------------------------------------------------------------------------------------------------------
# NPO's loss selector (npo_loss_type; the old spelling loss_type="npo"/"simnpo" is a deprecated alias)


@pytest.mark.parametrize("old", ["npo", "simnpo"])
def test_old_loss_type_spelling_is_a_deprecated_alias_for_npo_loss_type(tmp_path, old):
    with pytest.warns(FutureWarning, match="npo_loss_type"):
        args = _args(tmp_path, loss_type=old)
    assert (args.npo_loss_type, args.loss_type) == (old, "nll")  # loss_type is SFT's again
    with pytest.raises(ValueError, match="contradicts"):
        _args(tmp_path, loss_type="npo", npo_loss_type="simnpo")
    with pytest.raises(ValueError, match=r"NPOConfig.loss_type must be one of \(.*\), got 'dft'"):
        _args(tmp_path, loss_type="dft")  # SFT's loss types other than NLL would be silently ignored by NPO
    with pytest.raises(ValueError, match=r"NPOConfig.npo_loss_type must be one of \('npo', 'simnpo'\), got 'dpo'"):
        _args(tmp_path, npo_loss_type="dpo")


def test_simnpo_trainer_by_either_spelling_is_reference_free_and_matches_the_formula(tmp_path):
    from hf_align import testbed
    from hf_align.trainers import NPOTrainer

    tok = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    losses = []
    for spelling in ({"npo_loss_type": "simnpo"}, {"loss_type": "simnpo"}):
        with pytest.warns(FutureWarning) if "loss_type" in spelling else contextlib.nullcontext():
            args = _args(tmp_path, beta=2.0, simnpo_gamma=0.5, **spelling)
        trainer = NPOTrainer(
            copy.deepcopy(model), args=args, train_dataset=testbed.forget_dataset(4), processing_class=tok
        )
        assert trainer._ref_mode == "none" and trainer.ref_model is None
        batch = _batch(trainer)
        completion = (batch["labels"][:, 1:] != -100).float()
        expected = simnpo_loss(_manual_token_logps(model, batch), completion, 2.0, 0.5).mean()
        losses.append(trainer.compute_loss(trainer.model, batch).item())
        assert losses[-1] == pytest.approx(expected.item(), rel=1e-5)
    assert losses[0] == losses[1]


def test_cli_and_recipe_accept_the_old_spelling(tmp_path):
    from hf_align.cli.training import make_parser

    common = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loss_type: simnpo\n")
    for argv in (["--loss_type", "simnpo"], ["--config", str(recipe)], ["--npo_loss_type", "simnpo"]):
        with pytest.warns(FutureWarning) if "--npo_loss_type" not in argv else contextlib.nullcontext():
            _, args, *_ = make_parser("npo").parse([*common, *argv])
        assert (args.npo_loss_type, args.loss_type) == ("simnpo", "nll"), argv


# ------------------------------------------------------------------------------------------------------------------
# NPO's collator keeps every option of TRL's


def test_npo_collator_keeps_every_field_of_trls_collator_including_return_position_ids(tmp_path):
    """SFTTrainer sets ``return_position_ids`` on its collator (sequence parallelism); NPO's upgrade must keep it."""
    import dataclasses

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from hf_align import testbed
    from hf_align.trainers import NPOTrainer
    from hf_align.trainers.npo import DataCollatorForWeightedLanguageModeling

    tok = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    trl_collator = DataCollatorForLanguageModeling(
        pad_token_id=tok.pad_token_id, return_position_ids=True, pad_to_multiple_of=8
    )
    data = testbed.preference_dataset(4, seed=0).map(lambda ex: {"rejected_weights": [0.5] * len(ex["rejected"])})
    trainer = NPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=_args(tmp_path),
        data_collator=trl_collator,
        train_dataset=data,
        processing_class=tok,
    )
    collator = trainer.data_collator
    assert type(collator) is DataCollatorForWeightedLanguageModeling
    assert dataclasses.asdict(collator) == dataclasses.asdict(trl_collator)
    batch = _batch(trainer)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["token_weights"].shape == batch["input_ids"].shape
    length = int(batch["attention_mask"][0].sum())
    assert torch.equal(batch["position_ids"][0, :length], torch.arange(length))
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(2 * math.log(2) / 0.1, abs=1e-5)


def test_a_run_writes_its_forget_retain_curve_from_the_logged_names(tmp_path):
    from hf_align import plots, testbed
    from hf_align.trainers import NPOTrainer

    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    trainer = NPOTrainer(
        model, ref_model=copy.deepcopy(model), args=_args(tmp_path, retain_loss_type="nll"),
        train_dataset=testbed.forget_dataset(8), processing_class=testbed.load_tokenizer(),
        retain_dataset=testbed.retain_dataset(8),
    )  # fmt: skip
    trainer.train()
    assert (tmp_path / "out" / plots.FORGET_RETAIN_PLOT_FILE).is_file()
    (axes,) = plots.forget_retain_figure(trainer.state.log_history).axes
    curves = {line.get_label(): list(line.get_ydata()) for line in axes.lines}
    logged = [e for e in trainer.state.log_history if "retain/loss" in e]
    assert set(curves) == {"forget/loss", "retain/loss", "forget/nll"} and len(logged) == 2
    assert curves["retain/loss"] == [e["retain/loss"] for e in logged]
