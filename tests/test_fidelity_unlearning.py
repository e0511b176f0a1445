"""benchmarks/fidelity/unlearning.py: its losses against NPO's value at init, hf_align.losses and NPOTrainer; the
trade-off interpolation and the lr rule on hand-made curves; a tiny end-to-end run that renders from its JSON."""

import copy
import math

import pytest
import torch

from benchmarks.fidelity import unlearning as fu
from hf_align.testbed import quiet_training_args


def tiny_cfg(**overrides) -> dict:
    cfg = fu.settings(quick=True)
    cfg.update(forget_rows=16, train_retain_rows=16, steps=4, eval_every=2, test_prompts=8, heldout_prompts=8)
    cfg.update(retain_rows=8, lrs=[1e-3], methods=["ga", "npo+nll"])
    return {**cfg, **overrides}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the benchmark runs (two threads crawl on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tb():
    from hf_align import testbed

    return testbed.load()


@pytest.fixture(scope="module")
def sched(tb):
    return fu.schedule(tb, tiny_cfg(), seed=3, exclude=set())


def _grads(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_npo_at_init_is_2ln2_over_beta_and_steps_exactly_like_gradient_ascent(tb, sched):
    """At πθ = π_ref the NPO loss is 2·ln2/β (REFERENCES.md) and its weight 2σ(β·0) = 1: its gradient is GA's."""
    cfg = tiny_cfg()
    model = copy.deepcopy(tb.model)
    logps, mask = fu.token_logps(model, *sched.forget_batches[0])
    npo = fu.forget_loss("npo", logps, sched.ref_forget_logps[0], mask, cfg)
    assert npo.item() == pytest.approx(2 * math.log(2) / cfg["beta"], rel=1e-5)
    g_npo = _grads(model, npo)
    logps, mask = fu.token_logps(model, *sched.forget_batches[0])
    g_ga = _grads(model, fu.forget_loss("ga", logps, sched.ref_forget_logps[0], mask, cfg))
    assert torch.allclose(g_npo, g_ga, rtol=1e-4, atol=1e-7)
    # GA minimises the forget log-likelihood: the sum over completion tokens (EOS included), mean over the batch
    assert fu.forget_loss("ga", logps, logps, mask, cfg).item() == pytest.approx((logps.sum(-1)).mean().item())
    assert mask.sum(-1).min() >= 3  # at least one digit, " ugh" and EOS are scored


def test_written_out_losses_equal_hf_align_losses():
    from hf_align.losses import npo_sequence_loss, retain_kl, simnpo_loss

    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    logps = -torch.rand(2, 4, generator=gen, dtype=torch.float64) * 3 * mask
    ref = -torch.rand(2, 4, generator=gen, dtype=torch.float64) * 3 * mask
    cfg = dict(beta=0.1, simnpo_beta=2.5, simnpo_gamma=0.5)
    assert fu.forget_loss("npo", logps, ref, mask, cfg).item() == pytest.approx(
        npo_sequence_loss(logps, ref, mask, 0.1)[0].mean().item()
    )
    assert fu.forget_loss("simnpo", logps, ref, mask, cfg).item() == pytest.approx(
        simnpo_loss(logps, mask, 2.5, 0.5).mean().item()
    )
    # the retain KL on a batch whose "model" returns fixed logits
    logits, ref_logits = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 5, 6]])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})()

    kl = fu.retain_loss("kl", Fixed(), (labels.clamp(min=0), torch.ones_like(labels), labels), ref_logits[:, :-1])
    expected = retain_kl(logits[:, :-1], ref_logits[:, :-1], (labels[:, 1:] != -100).float())
    assert kl.item() == pytest.approx(expected.item(), rel=1e-6)


def _perturbed(model, seed: int = 0):
    """A copy away from the reference: at πθ = π_ref NPO's loss and the retain KL do not depend on the batch."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _trainer(tb, sched, cfg, policy, ref_model=None, **config):
    from datasets import Dataset

    from hf_align.trainers import NPOConfig, NPOTrainer

    rows = [sched.forget_rows[i] for idx in sched.forget_order for i in idx]
    forget = Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})
    retain = Dataset.from_dict(
        {"prompt": [p for p, _ in sched.retain_rows], "completion": [c for _, c in sched.retain_rows]}
    )
    args = NPOConfig(**quiet_training_args(
        output_dir="unused", per_device_train_batch_size=cfg["batch_size"], max_steps=cfg["steps"],
        train_sampling_strategy="sequential",
        activation_checkpointing=False, seed=sched.seed, **config,
    ))  # fmt: skip
    trainer = NPOTrainer(
        copy.deepcopy(policy), ref_model=ref_model, args=args, train_dataset=forget, retain_dataset=retain,
        processing_class=tb.tokenizer,
    )  # fmt: skip
    trainer.model.train()
    return trainer


@pytest.mark.parametrize(
    "method, config",
    [
        ("npo+nll", dict(beta=0.1, retain_loss_type="nll")),
        ("simnpo+kl", dict(npo_loss_type="simnpo", beta=2.5, simnpo_gamma=0.0, retain_loss_type="kl")),
    ],
)
def test_loop_loss_equals_npotrainers_on_every_batch_of_the_schedule(tb, sched, method, config, tmp_path, monkeypatch):
    """The same forget batch (sequential sampler over the loop's order) and the same retain batch (the loop's
    retain_order is the trainer's draw, here across a new retain permutation at step 2) give the same loss, for a
    policy away from the reference (the start model: the loop's precomputed values, the trainer's ref_model or, for
    the KL, the model it loads from the testbed's path)."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg()
    assert (cfg["beta"], cfg["simnpo_beta"], cfg["simnpo_gamma"]) == (0.1, 2.5, 0.0)  # the trainer's β, γ above
    model = _perturbed(tb.model).train()
    ref_model = copy.deepcopy(tb.model) if method.startswith("npo") else None
    trainer = _trainer(tb, sched, cfg, model, ref_model, **config)
    assert len(sched.retain_rows) // cfg["batch_size"] == 2  # so steps 2 and 3 are in the second retain cycle
    for step, batch in enumerate(trainer.get_train_dataloader()):
        trainer.state.global_step = step
        ours = fu.method_loss(method, model, sched, step, cfg)
        theirs = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5), step


def _curve(points):
    return [{"step": 5 * i, "forget_rate": r, "perplexity": p} for i, (r, p) in enumerate(points)]


def test_perplexity_at_interpolates_log_perplexity_at_the_first_crossing():
    curve = _curve([(0.3, 2.0), (0.2, 4.0), (0.1, 8.0)])
    assert fu.perplexity_at(curve, 0.15) == pytest.approx(math.sqrt(32))  # geometric, not (4 + 8) / 2
    assert fu.perplexity_at(curve, 0.2) == pytest.approx(4.0)
    assert fu.perplexity_at(curve, 0.3) == pytest.approx(2.0)  # the start is already there
    assert fu.perplexity_at(curve, 0.05) is None  # never reached
    wiggly = _curve([(0.3, 2.0), (0.1, 4.0), (0.2, 6.0), (0.05, 8.0)])  # the first bracket counts
    assert fu.perplexity_at(wiggly, 0.15) == pytest.approx(2**1.75)
    assert fu.perplexity_at(_curve([(0.3, 2.0), (0.0, math.inf)]), 0.1) == math.inf


def test_choose_lr_prefers_the_fixed_rate_then_half_the_start_then_the_lowest_last_rate():
    def sweep(**curves):
        return {lr.replace("_", "."): {"curve": _curve(points)} for lr, points in curves.items()}

    # start 0.3: the fixed rate 0.05 is reached by 1e-3 (ppl √(6·10)) and 3e-3 (ppl √(5·9)); 1e-4 is best at half
    lr, why = fu.choose_lr(
        sweep(
            **{"1e-4": [(0.3, 2), (0.15, 2.5), (0.1, 3)], "1e-3": [(0.3, 2), (0.1, 6), (0.0, 10)]},
            **{"3e-3": [(0.3, 2), (0.1, 5), (0.0, 9)]},
        ),
        fixed_rate=0.05,
    )
    assert (lr, why.split(" (")[0]) == ("3e-3", "lowest held-out retain perplexity at forget rate 0.050")
    lr, why = fu.choose_lr(
        sweep(**{"1e-4": [(0.3, 2), (0.2, 3)], "1e-3": [(0.3, 2), (0.1, 4)], "3e-3": [(0.3, 2), (0.1, 3)]}), 0.05
    )
    assert lr == "3e-3" and "(half)" in why
    lr, why = fu.choose_lr(sweep(**{"1e-4": [(0.3, 2), (0.25, 3)], "1e-3": [(0.3, 2), (0.2, 9)]}), 0.05)
    assert lr == "1e-3" and why.startswith("no lr reaches")


def test_perplexity_spread_is_geometric_and_compare_needs_every_seed_and_both_spreads():
    mean, factor = fu._gms([2.0, 8.0])  # log-scale mean and std: √(2·8), exp(std(ln 2, ln 8))
    assert mean == pytest.approx(4.0) and factor == pytest.approx(math.exp(math.log(4) / math.sqrt(2)))
    assert fu._gms([3.0, 1e30])[0] == pytest.approx(math.sqrt(3e30))  # one collapsed seed, not a mean of 5e29

    def entry(mean, factor, reached=3):
        return {"seeds": 3, "at_rate": {"half": {"reached": reached, "perplexity": [mean, factor]}}}

    assert fu.compare(entry(4.0, 1.05), entry(5.0, 1.05), "half") == "shown"  # 4.2 < 4.76
    assert fu.compare(entry(5.0, 1.05), entry(4.0, 1.05), "half") == "shown not to hold"
    assert fu.compare(entry(4.0, 1.2), entry(5.0, 1.2), "half") == "not shown"  # 4.8 > 4.17
    assert fu.compare(entry(4.0, 1.05, reached=2), entry(5.0, 1.05), "half").startswith("not shown: not reached")


def test_ga_and_npo_rerun_at_the_higher_of_their_chosen_lrs(monkeypatch):
    calls = []
    monkeypatch.setattr(fu, "unlearn", lambda tb, method, lr, *rest: calls.append((method, lr)) or {"lr": lr})
    methods = {"ga": 1e-3, "npo": 3e-4, "ga+nll": 3e-4, "npo+nll": 3e-4, "ga+kl": 1e-4, "npo+kl": 3e-3}
    result = {"methods": {m: {"lr": lr} for m, lr in methods.items()}}
    cfg, schedules = {"seeds": [0, 1]}, {0: None, 1: None}
    out = fu.equal_lr_runs(None, cfg, result, {"test": None}, {"test": None}, schedules)
    assert calls == [("npo", 1e-3)] * 2 + [("ga+kl", 3e-3)] * 2  # equal chosen lrs (retain NLL): nothing to rerun
    assert {m: (v["lr"], sorted(v["runs"])) for m, v in out.items()} == {
        "npo": (1e-3, ["0", "1"]),
        "ga+kl": (3e-3, ["0", "1"]),
    }


def test_heldout_retain_rows_skip_the_test_rows_prompts_and_repeats():
    class Fake:
        @staticmethod
        def retain_dataset(n):
            prompts = ["a=", "b=", "a=", "c=", "b=", "d=", "d=", "e=", "f="] * n
            return {"prompt": prompts[:n], "completion": [p[0] for p in prompts[:n]]}

    test, heldout = fu.retain_metric_rows(Fake(), {"retain_rows": 2})
    assert test == [("a=", "a"), ("b=", "b")] and heldout == [("c=", "c"), ("d=", "d")]


def test_tiny_run_uses_disjoint_rows_and_renders_from_its_json(tb, tmp_path):
    from hf_align.io import read_json, write_json

    cfg = tiny_cfg()
    test, heldout = fu.prompt_splits(cfg)
    retain_test, retain_heldout = fu.retain_metric_rows(tb, cfg)
    assert not set(test) & set(heldout) and not {p for p, _ in retain_test} & {p for p, _ in retain_heldout}
    exclude = set(test) | set(heldout) | {p for p, _ in retain_test + retain_heldout}
    exclude |= set(tb.forget_dataset(4, seed=400)["prompt"]) | set(tb.retain_dataset(4, seed=500)["prompt"])
    s = fu.schedule(tb, cfg, seed=0, exclude=exclude)  # the first rows of seed 0's draws must be skipped
    assert not {p for p, _ in s.forget_rows + s.retain_rows} & exclude
    assert all(c.endswith(" ugh") for _, c in s.forget_rows)

    result = fu.run(tb, cfg, log=lambda *a, **k: None)
    assert set(result["methods"]["ga"]["sweep"]) == {"0.001"} and result["methods"]["ga"]["lr"] == 1e-3
    assert result["methods"]["npo+nll"]["rerun_loss_gap"] == 0.0  # CPU training is deterministic
    assert result["summary"]["cross_check"]["max_loss_gap"] < 1e-4  # NPOTrainer on the loop's batches
    result["plot"] = "unlearning.png"
    fu.plot(result, tmp_path / result["plot"])
    write_json(tmp_path / "u.json", result)
    again = fu.refresh(read_json(tmp_path / "u.json"))
    lines = fu.markdown(again)
    assert lines[0].startswith("## Unlearning") and lines == fu.markdown(result)
    assert any(line.startswith("| `npo+nll` | 0.001 |") for line in lines)
    assert (tmp_path / "unlearning.png").stat().st_size > 10_000
