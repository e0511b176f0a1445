"""NPO vs gradient ascent with a retain term (NLL, KL), SimNPO alongside: the forget/retain trade-off on the testbed.

    python -m benchmarks.fidelity.unlearning [--quick] [--seeds 0 1 2]

The NPO paper (Zhang et al. 2024, arXiv 2404.05868) claims that NPO forgets at a lower cost to the retained skill than
gradient ascent (GA), that it slows GA's catastrophic collapse, and that a retain term (NLL or KL on retain data)
lowers the cost further; SimNPO (Fan et al. 2024, arXiv 2410.07163) claims a better trade-off than NPO without a
reference model. Here every loss × retain term unlearns the testbed's forget behaviour (answers followed by `` ugh``,
``tb.forget_dataset``), sequence level, written out in one plain loop:

* GA: ``L = E[log πθ(y|x)]`` (sequence log-likelihood, minimised): NPO's β → 0 limit minus its constant 2·ln2/β;
* NPO: ``L = −(2/β)·E[log σ(−β·(log πθ(y|x) − log π_ref(y|x)))]``, β = 0.1, π_ref the start model;
* SimNPO: ``L = −(2/β)·E[log σ(−(β/|y|)·log πθ(y|x) − γ)]``, β = 2.5, γ = 0 (OPTML-Group's released TOFU-forget05
  SimNPO model, the code base of the paper; their TOFU runs use γ = 0);
* retain term (``retain_weight`` 1): none, NLL (mean per retain completion token, EOS included) or KL
  (``KL(π_ref ‖ πθ)`` over the vocabulary, mean per retain completion token), on ``tb.retain_dataset`` rows;
* a control, ``nll_only``: the retain NLL alone (no forget loss). The retain rows are correct answers + EOS, so the
  NLL itself teaches "end without `` ugh``": the control shows how much of a ``+nll`` run's forgetting is that.

Budget, the same for every method: AdamW (no weight decay, no clipping), constant lr, ``steps`` steps of batch 8, the
same forget batches and the same retain batches (NPOTrainer's retain schedule) for every method of a seed. One lr sweep
for all, run on the first seed and chosen on **held-out** prompts and held-out retain rows (disjoint from the test
prompts and rows, and from all training rows) by one rule (:func:`choose_lr`); the other seeds rerun the chosen lr.
Each seed draws its own forget rows, batch order and retain rows. Every 5 steps: forget rate (fraction of one
temperature-1 sample per prompt that ends in `` ugh``) and retain perplexity over the answer digits of ``tb.retain_dataset``
rows no method trains on (no suffix, no EOS: the arithmetic, not the style). The trade-off: retain perplexity at
equal forget rate, interpolated per seed (:func:`perplexity_at`). Cross-check: NPO + retain NLL run through
``hf_align.trainers.NPOTrainer`` (precomputed reference) on the same batches.

Writes ``benchmarks/results/fidelity_unlearning[_quick].json`` and ``fidelity[_quick]_unlearning.png``;
``python -m benchmarks.fidelity`` renders it as its unlearning section.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from benchmarks.fidelity import common
from benchmarks.fidelity.common import HELDOUT_SEED, TEST_SEED, collate, encode, token_logps
from benchmarks.fidelity.common import fmt as _f
from benchmarks.fidelity.common import prompt_splits as common_splits
from hf_align.testbed import quiet_training_args


RESULTS = common.RESULTS
LOSSES = ("ga", "npo", "simnpo")
RETAINS = ("none", "nll", "kl")
CONTROL = "nll_only"
LOSS_NAMES = {"ga": "GA", "npo": "NPO", "simnpo": "SimNPO", "none": "retain NLL alone"}
RETAIN_NAMES = {"none": "no retain term", "nll": "retain NLL", "kl": "retain KL"}


def method_name(loss: str, retain: str) -> str:
    return loss if retain == "none" else f"{loss}+{retain}"


def split_method(method: str) -> tuple[str, str]:
    """(forget loss, retain term) of a method name; the control has no forget loss."""
    if method == CONTROL:
        return "none", "nll"
    loss, _, retain = method.partition("+")
    if loss not in LOSSES or (retain or "none") not in RETAINS:
        raise ValueError(f"unknown method {method!r}")
    return loss, retain or "none"


METHODS = (*(method_name(loss, retain) for retain in RETAINS for loss in LOSSES), CONTROL)


def settings(quick: bool) -> dict:
    common = dict(
        batch_size=8, beta=0.1, simnpo_beta=2.5, simnpo_gamma=0.0, retain_weight=1.0, eval_every=5,
        fixed_rate=0.05, forget_rows=128, methods=list(METHODS),
    )  # fmt: skip
    if quick:
        return dict(
            common, seeds=[0], lrs=[3e-4, 1e-3], steps=4, eval_every=2, test_prompts=32, heldout_prompts=32,
            retain_rows=16, train_retain_rows=64,
        )  # fmt: skip
    return dict(
        common, seeds=[0, 1, 2, 3], lrs=[1e-4, 3e-4, 1e-3, 3e-3], steps=40, test_prompts=256, heldout_prompts=256,
        retain_rows=128, train_retain_rows=256,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ data
def prompt_splits(cfg: dict) -> tuple[list[str], list[str]]:
    """Test prompts (the report's) and held-out prompts (lr selection only), disjoint."""
    return common_splits(cfg["test_prompts"], cfg["heldout_prompts"])


def retain_metric_rows(tb, cfg: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Retain rows for the perplexity metric: the test rows (``tb.retain_dataset(n)``, today's rows) and held-out rows
    (the rows after them whose prompts are new), so the lr is never chosen on the reported rows."""
    n = cfg["retain_rows"]
    data = tb.retain_dataset(8 * n)
    rows = list(zip(data["prompt"], data["completion"]))
    test = rows[:n]
    seen, heldout = {p for p, _ in test}, []
    for prompt, completion in rows[n:]:
        if prompt not in seen and len(heldout) < n:
            heldout.append((prompt, completion))
            seen.add(prompt)
    return test, heldout


def training_rows(dataset_fn, n: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) rows of a testbed dataset whose prompts are in no evaluation set."""
    data = dataset_fn(4 * n, seed=seed)
    rows = [(p, c) for p, c in zip(data["prompt"], data["completion"]) if p not in exclude][:n]
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} training rows outside the evaluation sets, {n} wanted")
    return rows


def forget_order(num_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Shuffled passes over the forget rows, one index list per step (today's ``_forget_batches`` order)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(num_rows, generator=gen).tolist()
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def retain_order(num_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """NPOTrainer's retain draw for one process, no accumulation: step k takes the next ``batch_size`` rows of a
    permutation seeded by ``seed + cycle`` (so the loop and the trainer see the same retain batches)."""
    per_cycle = num_rows // batch_size
    out = []
    for step in range(steps):
        cycle, position = divmod(step, per_cycle)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + cycle))
        out.append(perm[position * batch_size : (position + 1) * batch_size].tolist())
    return out


class Schedule(NamedTuple):
    """One seed's data and batch order, shared by every method: the same forget and retain batches for all, and the
    start model's (reference) values on them, computed once (a NamedTuple: the module is loaded by path)."""

    seed: int
    forget_rows: list[tuple[str, str]]
    retain_rows: list[tuple[str, str]]
    forget_order: list[list[int]]
    forget_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    retain_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ref_forget_logps: list[torch.Tensor]
    ref_retain_logits: list[torch.Tensor]


@torch.no_grad()
def schedule(tb, cfg: dict, seed: int, exclude: set[str]) -> Schedule:
    tok, bs, steps = tb.tokenizer, cfg["batch_size"], cfg["steps"]
    forget = training_rows(tb.forget_dataset, cfg["forget_rows"], 400 + seed, exclude)
    retain = training_rows(tb.retain_dataset, cfg["train_retain_rows"], 500 + seed, exclude)
    f_enc, r_enc = [encode(tok, *r) for r in forget], [encode(tok, *r) for r in retain]
    f_order = forget_order(len(forget), bs, steps, seed)
    f_batches = [collate([f_enc[i] for i in idx], tok.pad_token_id) for idx in f_order]
    r_batches = [
        collate([r_enc[i] for i in idx], tok.pad_token_id) for idx in retain_order(len(retain), bs, steps, seed)
    ]
    reference = tb.model.eval()
    return Schedule(
        seed=seed, forget_rows=forget, retain_rows=retain, forget_order=f_order, forget_batches=f_batches,
        retain_batches=r_batches, ref_forget_logps=[token_logps(reference, *b)[0] for b in f_batches],
        ref_retain_logits=[reference(input_ids=b[0], attention_mask=b[1]).logits[:, :-1].float() for b in r_batches],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- losses
def forget_loss(
    kind: str, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, cfg: dict
) -> torch.Tensor:
    """The forget loss of a batch, written out from the papers' formulas (checked against hf_align.losses in tests).

    ``logps``/``ref_logps``: per-token log-probs ``(B, T)``, zero off the completion; ``mask``: the completion."""
    seq = logps.sum(-1)  # log πθ(y|x)
    if kind == "ga":  # minimise the forget log-likelihood: NPO's β → 0 limit (minus 2·ln2/β)
        return seq.mean()
    if kind == "npo":
        beta = cfg["beta"]
        return (-(2.0 / beta) * F.logsigmoid(-beta * (seq - ref_logps.sum(-1)))).mean()
    if kind == "simnpo":  # reference-free, length-normalised, margin γ
        beta, gamma = cfg["simnpo_beta"], cfg["simnpo_gamma"]
        return (-(2.0 / beta) * F.logsigmoid(-(beta / mask.sum(-1)) * seq - gamma)).mean()
    if kind == "none":
        return logps.new_zeros(())
    raise ValueError(f"unknown forget loss {kind!r}")


def retain_loss(kind: str, model, batch, ref_logits: torch.Tensor) -> torch.Tensor:
    """The retain term on one retain batch: mean NLL per completion token, or KL(π_ref ‖ πθ) per completion token."""
    ids, attn, labels = batch
    if kind == "nll":
        logps, mask = token_logps(model, ids, attn, labels)
        return -logps.sum() / mask.sum()
    if kind == "kl":
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        ref = torch.log_softmax(ref_logits, -1)
        mask = (labels[:, 1:] != -100).float()
        return ((ref.exp() * (ref - logp)).sum(-1) * mask).sum() / mask.sum()
    raise ValueError(f"unknown retain term {kind!r}")


def method_loss(method: str, model, sched: Schedule, step: int, cfg: dict) -> torch.Tensor:
    """The loss of ``method`` on batch ``step`` of ``sched``: forget loss + retain_weight · retain term."""
    loss_kind, retain_kind = split_method(method)
    loss = torch.zeros(())
    if loss_kind != "none":
        logps, mask = token_logps(model, *sched.forget_batches[step])
        loss = forget_loss(loss_kind, logps, sched.ref_forget_logps[step], mask, cfg)
    if retain_kind != "none":
        retain = retain_loss(retain_kind, model, sched.retain_batches[step], sched.ref_retain_logits[step])
        loss = loss + cfg["retain_weight"] * retain
    return loss


# ------------------------------------------------------------------------------------------ evaluation
class Split:
    """Forget rate, mean reward and retain perplexity on one fixed prompt set, sampling seed and retain rows."""

    def __init__(self, tb, prompts: list[str], seed: int, retain_rows: list[tuple[str, str]]):
        self.tb, self.prompts, self.seed = tb, prompts, seed
        self.retain = ([p for p, _ in retain_rows], [c for _, c in retain_rows])

    def __call__(self, model) -> dict:
        from hf_align.evaluation import perplexity
        from hf_align.testbed import has_forget_behaviour, reward
        from hf_align.testbed.evaluation import generate_completions

        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # NaN logits cannot be sampled
            return {"forget_rate": math.nan, "mean_reward": math.nan, "perplexity": math.nan, "diverged": True}
        model.eval()
        samples = generate_completions(model, self.tb.tokenizer, self.prompts, seed=self.seed)
        ppl = perplexity(model, self.tb.tokenizer, *self.retain, append_eos=False)["perplexity"]
        return {
            "forget_rate": statistics.fmean(has_forget_behaviour(s) for s in samples),
            "mean_reward": statistics.fmean(reward(self.prompts, samples)),
            "perplexity": ppl,
        }


def unlearn(tb, method: str, lr: float, sched: Schedule, split: Split, start: dict, cfg: dict) -> dict:
    """One method at one lr on one seed's schedule: the per-step losses and the curve every ``eval_every`` steps
    (step 0 is the start model, evaluated once per split and shared)."""
    torch.manual_seed(sched.seed)
    model = copy.deepcopy(tb.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve, losses = [{"step": 0, **start}], []
    for step in range(cfg["steps"]):
        loss = method_loss(method, model, sched, step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % cfg["eval_every"] == 0:
            curve.append({"step": step + 1, **split(model)})
            model.train()
    return {"curve": curve, "losses": losses}


def perplexity_at(curve: list[dict], rate: float) -> float | None:
    """Retain perplexity where the run first reaches forget rate ``rate``: log-perplexity interpolated linearly in
    the forget rate between the two evaluations that bracket it; None when the run never gets there."""
    if curve[0]["forget_rate"] <= rate:
        return curve[0]["perplexity"]
    for before, after in zip(curve, curve[1:]):
        if after["forget_rate"] <= rate:
            if not (math.isfinite(before["perplexity"]) and math.isfinite(after["perplexity"])):
                return math.inf  # reached, at a collapsed (overflowed) perplexity
            w = (before["forget_rate"] - rate) / (before["forget_rate"] - after["forget_rate"])
            log_ppl = (1 - w) * math.log(before["perplexity"]) + w * math.log(after["perplexity"])
            return math.exp(log_ppl)
    return None


def targets(start_rate: float, fixed_rate: float) -> dict[str, float]:
    """The forget rates the trade-off is read at: half the start model's, and a fixed low rate."""
    return {"half": start_rate / 2, "fixed": fixed_rate}


def choose_lr(sweep: dict[str, dict], fixed_rate: float) -> tuple[str, str]:
    """The lr (a key of ``sweep``) and the reason, from held-out curves only: the lowest held-out retain perplexity
    at forget rate ``fixed_rate``; if no lr gets there, at half the start's forget rate; if none gets there
    either, the lowest last held-out forget rate (ties: the lower last perplexity)."""
    start_rate = next(iter(sweep.values()))["curve"][0]["forget_rate"]
    goals = targets(start_rate, fixed_rate)
    for label, rate in sorted(goals.items(), key=lambda kv: kv[1]):
        reached = {lr: perplexity_at(v["curve"], rate) for lr, v in sweep.items()}
        reached = {lr: p for lr, p in reached.items() if p is not None and math.isfinite(p)}
        if reached:
            best = min(reached, key=lambda lr: (reached[lr], float(lr)))
            return best, f"lowest held-out retain perplexity at forget rate {rate:.3f} ({label})"

    def last(lr):
        point = sweep[lr]["curve"][-1]
        rate, ppl = point["forget_rate"], point["perplexity"]
        return (rate if math.isfinite(rate) else math.inf, ppl if math.isfinite(ppl) else math.inf)

    return min(sweep, key=last), "no lr reaches half the start's forget rate: lowest last held-out forget rate"


@contextlib.contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars while the trainer tokenizes (restored as they were)."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def npo_trainer_check(tb, cfg: dict, lr: float, sched: Schedule, split: Split) -> dict:
    """NPO + retain NLL through hf_align.trainers.NPOTrainer on the loop's batches: the forget rows in the loop's
    order (sequential sampler), the same retain rows and seed (its retain draw is the loop's), precomputed reference,
    no clipping. Returns its per-step losses and its last evaluation."""
    import tempfile

    from datasets import Dataset
    from transformers import PrinterCallback

    from hf_align.trainers import NPOConfig, NPOTrainer

    rows = [sched.forget_rows[i] for idx in sched.forget_order for i in idx]
    forget = Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})
    retain = Dataset.from_dict(
        {"prompt": [p for p, _ in sched.retain_rows], "completion": [c for _, c in sched.retain_rows]}
    )
    with tempfile.TemporaryDirectory(prefix="fidelity-unlearning-") as out:
        config = NPOConfig(**quiet_training_args(
            output_dir=out, per_device_train_batch_size=cfg["batch_size"], max_steps=cfg["steps"], learning_rate=lr,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, beta=cfg["beta"],
            npo_level="sequence", retain_loss_type="nll", retain_weight=cfg["retain_weight"],
            precompute_ref_log_probs=True, train_sampling_strategy="sequential",
            activation_checkpointing=False,
            logging_steps=1, seed=sched.seed,
        ))  # fmt: skip
        with _quiet_datasets():
            trainer = NPOTrainer(
                copy.deepcopy(tb.model), args=config, train_dataset=forget, retain_dataset=retain,
                processing_class=tb.tokenizer,
            )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 for the per-step losses, not for the console
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "last": {"step": cfg["steps"], **split(trainer.model.eval())}}


# --------------------------------------------------------------------------------------------- running
def run_method(tb, cfg: dict, method: str, splits: dict, starts: dict, schedules: dict) -> dict:
    """The lr sweep on the first seed (held-out split), the chosen lr on every seed (test split)."""
    t0, seeds = time.time(), cfg["seeds"]
    sweep = {
        f"{lr:g}": unlearn(tb, method, lr, schedules[seeds[0]], splits["heldout"], starts["heldout"], cfg)
        for lr in cfg["lrs"]
    }
    lr, reason = choose_lr(sweep, cfg["fixed_rate"])
    runs = {str(s): unlearn(tb, method, float(lr), schedules[s], splits["test"], starts["test"], cfg) for s in seeds}
    # the first seed's test run repeats its sweep run's training: CPU training is deterministic, so the losses match
    rerun_gap = max(abs(a - b) for a, b in zip(sweep[lr]["losses"], runs[str(seeds[0])]["losses"]))
    return {"sweep": sweep, "lr": float(lr), "lr_rule": reason, "rerun_loss_gap": rerun_gap,
            "runs": runs, "seconds": round(time.time() - t0, 1)}  # fmt: skip


def equal_lr_runs(tb, cfg: dict, result: dict, splits: dict, starts: dict, schedules: dict) -> dict:
    """GA and NPO at one lr, the higher of their two chosen lrs (where a collapse shows), on every seed: the method
    chosen at the lower lr reruns at the higher one. The collapse claim is about equal lr, the trade-off's is not."""
    out = {}
    for retain in RETAINS:
        pair = [method_name(loss, retain) for loss in ("ga", "npo")]
        if not set(pair) <= set(result["methods"]):
            continue
        lr = max(result["methods"][x]["lr"] for x in pair)
        for x in (x for x in pair if result["methods"][x]["lr"] != lr):
            runs = {
                str(s): unlearn(tb, x, lr, schedules[s], splits["test"], starts["test"], cfg) for s in cfg["seeds"]
            }
            out[x] = {"lr": lr, "runs": runs}
    return out


def run(tb, cfg: dict, log=print) -> dict:
    started = time.time()
    test, heldout = prompt_splits(cfg)
    retain_test, retain_heldout = retain_metric_rows(tb, cfg)
    exclude = set(test) | set(heldout) | {p for p, _ in retain_test + retain_heldout}
    splits = {
        "test": Split(tb, test, TEST_SEED, retain_test),
        "heldout": Split(tb, heldout, HELDOUT_SEED, retain_heldout),
    }
    starts = {name: split(tb.model) for name, split in splits.items()}
    schedules = {seed: schedule(tb, cfg, seed, exclude) for seed in cfg["seeds"]}
    result: dict = {"settings": cfg, "start": starts, "methods": {}}
    for method in cfg["methods"]:
        entry = result["methods"][method] = run_method(tb, cfg, method, splits, starts, schedules)
        last = [round(r["curve"][-1]["forget_rate"], 3) for r in entry["runs"].values()]
        log(f"  unlearning {method}: lr {entry['lr']:g}, test forget rate at the end {last} ({entry['seconds']:.0f}s)",
            flush=True)  # fmt: skip
    t0 = time.time()
    result["equal_lr"] = equal_lr_runs(tb, cfg, result, splits, starts, schedules)
    log(
        f"  unlearning GA and NPO at equal lr: {sorted(result['equal_lr'])} rerun ({time.time() - t0:.0f}s)",
        flush=True,
    )
    if "npo+nll" in result["methods"]:  # the cross-check reruns NPO + retain NLL at its chosen lr, every seed
        t0, lr = time.time(), result["methods"]["npo+nll"]["lr"]
        result["cross_check"] = {"method": "npo+nll", "lr": lr, "runs": {}}
        for seed in cfg["seeds"]:
            result["cross_check"]["runs"][str(seed)] = npo_trainer_check(tb, cfg, lr, schedules[seed], splits["test"])
        log(f"  unlearning NPOTrainer cross-check ({time.time() - t0:.0f}s)", flush=True)
    result["summary"] = summarize(result)
    result["wall_s"] = round(time.time() - started, 1)
    result["torch_threads"] = torch.get_num_threads()
    result["findings"] = findings(result)
    return result


# --------------------------------------------------------------------------------------------- report
def _ms(values: list[float]) -> list[float]:
    """[mean, std] (std 0 for one value); a list, as it reads back from JSON."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 and all(math.isfinite(v) for v in values) else 0.0
    return [mean, std if math.isfinite(mean) else math.nan]


def _gms(values: list[float]) -> list[float]:
    """[geometric mean, geometric std factor] of perplexities: mean and std of the log (the per-token NLL), so one
    collapsed seed (perplexity 1e9) does not swamp the others as it would an arithmetic mean and std."""
    if any(math.isnan(v) for v in values):
        return [math.nan, math.nan]
    if any(math.isinf(v) for v in values):
        return [math.inf, math.nan]
    logs = [math.log(v) for v in values]
    return [math.exp(statistics.fmean(logs)), math.exp(statistics.stdev(logs)) if len(logs) > 1 else 1.0]


STATS = {"forget_rate": _ms, "perplexity": _gms, "mean_reward": _ms}


def _num(x: float) -> str:
    return f"{x:.2f}" if not math.isfinite(x) or abs(x) < 1e4 else f"{x:.3g}"


def _fp(v, n: int = 2) -> str:
    """A perplexity: geometric mean ×/÷ geometric std factor (the mean alone for one seed)."""
    if v is None:
        return "not reached"
    factor = f"{v[1]:.2f}" if not math.isfinite(v[1]) or v[1] < 100 else f"{v[1]:.3g}"
    return f"{_num(v[0])} ×/÷ {factor}" if n > 1 else _num(v[0])


def _below(a, b) -> bool:
    """Perplexity a below b by more than both spreads together, on the log scale: a·f_a < b / f_b (a weak test with a
    few seeds; the text says so)."""
    return a[0] * a[1] < b[0] / b[1]


def ordered(result: dict) -> list[str]:
    """The methods in the settings' order (a JSON round trip sorts the keys)."""
    return [m for m in result["settings"]["methods"] if m in result["methods"]]


def _at_rates(curves: list[list[dict]], goals: dict[str, float]) -> dict:
    """Per target forget rate: each curve's interpolated retain perplexity (None: not reached) and their geometric
    mean and spread over the curves that reach it."""
    out = {}
    for label, rate in goals.items():
        values = [perplexity_at(c, rate) for c in curves]
        got = [v for v in values if v is not None]
        out[label] = {"rate": rate, "values": values, "reached": len(got), "perplexity": _gms(got) if got else None}
    return out


def _curve_stats(curves: list[list[dict]]) -> list[dict]:
    return [
        {"step": p["step"], **{k: fn([c[i][k] for c in curves]) for k, fn in STATS.items()}}
        for i, p in enumerate(curves[0])
    ]


def summarize(result: dict) -> dict:
    cfg = result["settings"]
    goals = targets(result["start"]["test"]["forget_rate"], cfg["fixed_rate"])
    heldout_goals = targets(result["start"]["heldout"]["forget_rate"], cfg["fixed_rate"])
    out: dict = {"targets": goals, "heldout_targets": heldout_goals, "methods": {}, "equal_lr": {}}
    for method in ordered(result):
        entry = result["methods"][method]
        curves = [entry["runs"][str(s)]["curve"] for s in cfg["seeds"] if str(s) in entry["runs"]]
        curve = _curve_stats(curves)
        sweep = {}
        for lr, run in entry["sweep"].items():
            at = _at_rates([run["curve"]], heldout_goals)
            sweep[lr] = {
                **{label: v["values"][0] for label, v in at.items()},
                "last_forget_rate": run["curve"][-1]["forget_rate"],
                "last_perplexity": run["curve"][-1]["perplexity"],
            }
        out["methods"][method] = {
            "lr": entry["lr"], "curve": curve, "last": curve[-1], "at_rate": _at_rates(curves, goals), "sweep": sweep,
            "seeds": len(curves), "last_perplexities": [c[-1]["perplexity"] for c in curves],
        }  # fmt: skip
    for method, entry in result.get("equal_lr", {}).items():
        curves = [entry["runs"][str(s)]["curve"] for s in cfg["seeds"] if str(s) in entry["runs"]]
        out["equal_lr"][method] = {
            "lr": entry["lr"], "last": _curve_stats(curves)[-1], "last_perplexities": [c[-1]["perplexity"] for c in curves]
        }  # fmt: skip
    check = result.get("cross_check")
    if check and check["method"] in result["methods"]:
        runs = result["methods"][check["method"]]["runs"]
        seeds = [s for s in check["runs"] if s in runs]
        gaps = [
            [abs(a - b) for a, b in zip(check["runs"][s]["losses"], runs[s]["losses"], strict=True)] for s in seeds
        ]
        worst = max(range(len(gaps[0])), key=lambda k: max(g[k] for g in gaps))
        early = min(10, len(gaps[0]))
        out["cross_check"] = {
            "method": check["method"], "lr": check["lr"], "max_loss_gap": max(g[worst] for g in gaps),
            "max_loss_gap_step": worst + 1, "early_steps": early, "early_loss_gap": max(max(g[:early]) for g in gaps),
            "trainer": {k: STATS[k]([check["runs"][s]["last"][k] for s in seeds]) for k in ("forget_rate", "perplexity")},
            "loop": {k: STATS[k]([runs[s]["curve"][-1][k] for s in seeds]) for k in ("forget_rate", "perplexity")},
        }  # fmt: skip
    return out


def _verdict(a, b) -> str:
    """'shown' when perplexity a is below b by more than both spreads, 'shown not to hold' when above."""
    return "shown" if _below(a, b) else "shown not to hold" if _below(b, a) else "not shown"


def compare(a: dict, b: dict, label: str) -> str:
    """Verdict on "a has a lower retain perplexity than b at target ``label``", from the summary's at_rate entries:
    both must reach the rate on every seed."""
    x, y = a["at_rate"][label], b["at_rate"][label]
    if x["reached"] < a["seeds"] or y["reached"] < b["seeds"]:
        return "not shown: not reached on every seed"
    return _verdict(x["perplexity"], y["perplexity"])


def _at_text(v: dict, label: str, n: int) -> str:
    """Retain perplexity at a target rate, saying on how many seeds when not on all of them."""
    got = v["at_rate"][label]
    text = _fp(got["perplexity"], n)
    return text + (f" ({got['reached']}/{v['seeds']} seeds)" if 0 < got["reached"] < v["seeds"] else "")


def _seeds_lower(xs: list, ys: list) -> str:
    """On how many seeds x < y (seed by seed: both runs of a seed share its data); context for the verdict."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    return f"; lower on {sum(x < y for x, y in pairs)}/{len(pairs)} seeds" if len(pairs) > 1 else ""


def _pair(s: dict, a: str, b: str, n: int) -> str:
    """Both targets of one comparison, numbers and verdict: 'at 0.139: 4.1 ×/÷ 1.1 vs 4.5 ×/÷ 1.1 (shown; lower on
    5/5 seeds); …'."""
    parts = []
    for label, rate in s["targets"].items():
        x, y = s["methods"][a], s["methods"][b]
        lower = _seeds_lower(x["at_rate"][label]["values"], y["at_rate"][label]["values"])
        parts.append(
            f"at {rate:.3f}: {_at_text(x, label, n)} vs {_at_text(y, label, n)} ({compare(x, y, label)}{lower})"
        )
    return "; ".join(parts)


def _collapse(s: dict, retain: str, steps: int, seed: int, n: int) -> str | None:
    """The collapse claim for one retain term: GA vs NPO at step ``steps`` at equal lr (every seed), then each at its
    chosen lr and the single-seed sweep for context."""
    npo, ga = method_name("npo", retain), method_name("ga", retain)
    m = s["methods"]
    if not {npo, ga} <= set(m):
        return None
    lr = max(m[npo]["lr"], m[ga]["lr"])
    at_lr = [s["equal_lr"].get(x) or (m[x] if m[x]["lr"] == lr else None) for x in (npo, ga)]
    if None in at_lr:  # an older result without the equal-lr runs: compare at the chosen lrs, and say so
        lr, at_lr = None, [m[npo], m[ga]]
    (a, b), lower = (v["last"] for v in at_lr), _seeds_lower(*(v["last_perplexities"] for v in at_lr))
    lower = f" (NPO {lower[2:]})" if lower else ""
    lrs = sorted(set(m[npo]["sweep"]) & set(m[ga]["sweep"]), key=float)
    sweep = ", ".join(
        f"{x}: {_num(m[npo]['sweep'][x]['last_perplexity'])} vs {_num(m[ga]['sweep'][x]['last_perplexity'])}"
        for x in lrs
    )
    one = " (one seed, no spread)" if n == 1 else ""
    return (
        f"- **NPO slows the collapse, {RETAIN_NAMES[retain]} — {_verdict(a['perplexity'], b['perplexity'])}{one}.** "
        f"Retain perplexity at step {steps}, "
        + (
            f"both at lr {lr:g} (the higher of the two chosen lrs)"
            if lr
            else "each at its chosen lr (no equal-lr run)"
        )
        + f": NPO {_fp(a['perplexity'], n)} vs GA {_fp(b['perplexity'], n)}{lower}, forget rate "
        f"{_f(a['forget_rate'], 3, n)} vs {_f(b['forget_rate'], 3, n)}. Each at its chosen lr: NPO {_fp(m[npo]['last']['perplexity'], n)} (lr "
        f"{m[npo]['lr']:g}) vs GA {_fp(m[ga]['last']['perplexity'], n)} (lr {m[ga]['lr']:g}). The sweep (seed {seed}, "
        f"held-out split), NPO vs GA at step {steps} per lr: {sweep}."
    )


def findings(result: dict) -> list[str]:
    """Claim by claim, from the numbers (so the text never outruns them)."""
    cfg, s = result["settings"], result["summary"]
    m, n, steps = s["methods"], len(cfg["seeds"]), cfg["steps"]
    one = " (one seed, no spread)" if n == 1 else ""
    out = []
    for retain in RETAINS:
        npo, ga = method_name("npo", retain), method_name("ga", retain)
        if {npo, ga} <= set(m):
            out.append(
                f"- **NPO below GA in retain perplexity at equal forget rate, {RETAIN_NAMES[retain]}{one}:** NPO vs GA "
                f"(lr {m[npo]['lr']:g} vs {m[ga]['lr']:g}) {_pair(s, npo, ga, n)}."
            )
    out += [line for retain in RETAINS if (line := _collapse(s, retain, steps, cfg["seeds"][0], n))]
    for loss in LOSSES:
        base = method_name(loss, "none")
        parts = [
            f"+{retain.upper()} {_pair(s, method_name(loss, retain), base, n)}"
            for retain in ("nll", "kl")
            if {base, method_name(loss, retain)} <= set(m)
        ]
        if parts:
            out.append(
                f"- **A retain term lowers {LOSS_NAMES[loss]}'s tax (retain perplexity with vs without it, at equal "
                f"forget rate){one}:** " + "; ".join(parts) + "."
            )
    for retain in RETAINS:
        sim, npo = method_name("simnpo", retain), method_name("npo", retain)
        if {sim, npo} <= set(m):
            out.append(
                f"- **SimNPO below NPO in retain perplexity at equal forget rate, {RETAIN_NAMES[retain]}{one}:** SimNPO "
                f"vs NPO (lr {m[sim]['lr']:g} vs {m[npo]['lr']:g}) {_pair(s, sim, npo, n)}."
            )
    if CONTROL in m:
        label, rate = "fixed", s["targets"]["fixed"]
        ctrl = m[CONTROL]
        beaten = [x for x in m if x != CONTROL and compare(m[x], ctrl, label) == "shown"]
        worse = [x for x in m if x != CONTROL and compare(ctrl, m[x], label) == "shown"]
        start = result["start"]["test"]
        out.append(
            f"- **Where the unlearning losses lose — the retain NLL alone (control, no forget loss){one}:** forget rate "
            f"{start['forget_rate']:.3f} → {_f(ctrl['last']['forget_rate'], 3, n)} in {steps} steps at retain perplexity "
            f"{_fp(ctrl['last']['perplexity'], n)} (start {start['perplexity']:.2f}); at forget rate {rate:.3f} "
            f"{_at_text(ctrl, label, n)}. Below the control there by more than the spreads: "
            f"{', '.join(beaten) or 'none'}; above it: {', '.join(worse) or 'none'}. The retain rows are correct answers "
            "+ EOS, the forget rows the same kind of answers + ` ugh` + EOS: the NLL itself teaches the ending the "
            "forget loss removes, while a forget loss on the whole completion also pushes down the answer digits."
        )
    edges = [
        f"{x} ({m[x]['lr']:g})" for x in m if len(cfg["lrs"]) > 1 and m[x]["lr"] in (min(cfg["lrs"]), max(cfg["lrs"]))
    ]
    if edges:
        out.append(
            "- **Fair-budget caveat:** chosen lrs at an edge of the sweep (a better one may lie outside it): "
            + ", ".join(edges) + "."
        )  # fmt: skip
    check = s.get("cross_check")
    if check:
        out.append(
            f"- **Cross-check, `NPOTrainer` (NPO + retain NLL, lr {check['lr']:g}, the loop's batches, precomputed "
            f"reference) vs the loop:** per-step losses agree to {check['early_loss_gap']:.1g} over the first "
            f"{check['early_steps']} steps, then drift apart as float rounding is amplified by training (largest gap "
            f"{check['max_loss_gap']:.2g}, step {check['max_loss_gap_step']}); at step {steps} forget rate "
            f"{_f(check['trainer']['forget_rate'], 3, n)} vs {_f(check['loop']['forget_rate'], 3, n)}, retain "
            f"perplexity {_fp(check['trainer']['perplexity'], n)} vs {_fp(check['loop']['perplexity'], n)}."
        )
    out.append(
        f"- Spread over {n} seed(s) (forget rows, batch order, retain rows): rates and rewards mean ± std, perplexities "
        "geometric mean ×/÷ geometric std (mean ± std of the log: one collapsed seed would swamp an arithmetic mean). "
        "'Shown' means separated by more than both spreads together (a weak test with a few seeds); a forget rate "
        "counts as reached only when every seed reaches it."
    )
    return out


def _label(method: str) -> str:
    loss, retain = split_method(method)
    return LOSS_NAMES[loss] if method == CONTROL else f"{LOSS_NAMES[loss]}, {RETAIN_NAMES[retain]}"


def markdown(result: dict, heading: str = "##") -> list[str]:
    cfg, s, start = result["settings"], result["summary"], result["start"]
    n, steps, goals, seed0 = len(cfg["seeds"]), cfg["steps"], s["targets"], cfg["seeds"][0]
    half, fixed = goals["half"], goals["fixed"]
    rerun_gap = max(result["methods"][x]["rerun_loss_gap"] for x in ordered(result))
    equal = ", ".join(f"`{x}` at {v['lr']:g}" for x, v in sorted(result.get("equal_lr", {}).items())) or "none needed"
    spread = (
        f"over seeds {cfg['seeds']}: rates and rewards mean ± std, perplexities geometric mean ×/÷ geometric std (the "
        "mean ± std of the log-perplexity: one collapsed seed would swamp an arithmetic mean)"
        if n > 1
        else "one seed"
    )
    lines = [
        f"{heading} Unlearning: NPO vs gradient ascent with a retain term, SimNPO alongside (one budget for every "
        "method)",
        "",
        f"`benchmarks/fidelity/unlearning.py`, {result['wall_s'] / 60:.1f} min on CPU, {result.get('torch_threads', 1)} "
        f"torch thread(s). Forget set: {cfg['forget_rows']} rows of `tb.forget_dataset` per seed (correct answer + "
        "` ugh` + EOS; prompts disjoint from every evaluation set). Sequence-level losses, written out in one loop: "
        "GA `E[log πθ(y|x)]` (NPO's β → 0 limit less its constant), NPO `−(2/β)·E[log σ(−β·log(πθ/π_ref)(y|x))]` "
        f"with β = {cfg['beta']}, SimNPO `−(2/β)·E[log σ(−(β/|y|)·log πθ(y|x) − γ)]` with β = {cfg['simnpo_beta']}, "
        f"γ = {cfg['simnpo_gamma']:g} (the values of OPTML-Group's released TOFU-forget05 SimNPO model, from the "
        "paper's code base). Each with retain term none, NLL (mean per retain completion token, EOS included) or KL "
        f"(`KL(π_ref‖πθ)` per retain completion token), weight {cfg['retain_weight']:g}, on "
        f"{cfg['train_retain_rows']} `tb.retain_dataset` rows per seed (disjoint from the metric rows and prompts); "
        "plus the control `nll_only`, the retain NLL alone. AdamW (no weight decay, no clipping), constant lr, "
        f"{steps} steps of batch {cfg['batch_size']}; within a seed every method sees the same forget batches and the "
        "same retain batches (NPOTrainer's retain schedule).",
        "",
        f"Metrics, every {cfg['eval_every']} steps: forget rate, the fraction of one temperature-1 sample per prompt "
        f"ending in ` ugh` ({cfg['test_prompts']} test prompts: `tb.mean_reward`'s prompts and sampler); retain "
        f"perplexity over the answer digits of {cfg['retain_rows']} `tb.retain_dataset` rows (no suffix, no EOS: the "
        "arithmetic, not the style). Retain perplexity at equal forget rate: each seed's log-perplexity interpolated "
        'linearly in the forget rate between the two evaluations that first bracket the rate ("not reached" when '
        f"the run never gets there), read at half the start model's forget rate ({half:.3f}) and at {fixed:.3f}.",
        "",
        f"Fair budget: one lr sweep for every method, {cfg['lrs']}, run on seed {seed0} and chosen on "
        f"{cfg['heldout_prompts']} **held-out** prompts and {cfg['retain_rows']} held-out retain rows (disjoint from the "
        "test prompts and rows and from all training rows) by one rule: the lowest held-out retain perplexity at "
        f"forget rate {fixed:.3f}; if no lr reaches it, at half the held-out start's forget rate "
        f"({s['heldout_targets']['half']:.3f}); if none reaches that either, the lowest last held-out forget rate. The "
        f"other seeds rerun the chosen lr; seed {seed0}'s test run repeats its sweep run's training (largest per-step "
        f"loss difference {rerun_gap:.1g}). For the collapse claim GA and NPO also run at one lr, the higher of their "
        f"two chosen lrs, on every seed ({equal}). Test split below, {spread}.",
        "",
        f"| method | lr | retain ppl at forget rate {half:.3f} | at {fixed:.3f} | forget rate, step {steps} | "
        f"retain ppl, step {steps} | mean reward, step {steps} |",
        "|---|---|---|---|---|---|---|",
        f"| start model | – | – | – | {start['test']['forget_rate']:.3f} | {start['test']['perplexity']:.2f} | "
        f"{start['test']['mean_reward']:.3f} |",
    ]
    for method in ordered(result):
        v = s["methods"][method]
        cells = [
            f"`{method}`", f"{v['lr']:g}", _at_text(v, "half", n), _at_text(v, "fixed", n),
            _f(v["last"]["forget_rate"], 3, n), _fp(v["last"]["perplexity"], n), _f(v["last"]["mean_reward"], 3, n),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    first = s["methods"][ordered(result)[0]]["curve"]
    lines += [
        "",
        "Along the run (test split; forget rate mean / retain perplexity geometric mean; spreads in the JSON and the "
        "plot):",
        "",
        "| method | " + " | ".join(f"step {p['step']}" for p in first) + " |",
        "|---|" + "---|" * len(first),
    ]
    for method in ordered(result):
        curve = s["methods"][method]["curve"]
        lines.append(
            f"| `{method}` | "
            + " | ".join(f"{p['forget_rate'][0]:.3f} / {_num(p['perplexity'][0])}" for p in curve)
            + " |"
        )
    hg = s["heldout_targets"]
    lines += [
        "",
        f"The lr sweep (seed {cfg['seeds'][0]}, held-out split, start forget rate "
        f"{start['heldout']['forget_rate']:.3f}; lr: retain ppl at forget rate {hg['fixed']:.3f} / at {hg['half']:.3f} "
        f'/ forget rate at step {steps}; "–" not reached; the chosen lr in bold):',
        "",
        "| method | sweep | rule that chose |",
        "|---|---|---|",
    ]
    for method in ordered(result):
        entry, sweep = result["methods"][method], s["methods"][method]["sweep"]
        chosen, cells = f"{entry['lr']:g}", []
        for lr, v in sorted(sweep.items(), key=lambda kv: float(kv[0])):
            ppl = [_num(v[k]) if v[k] is not None else "–" for k in ("fixed", "half")]
            text = f"{lr}: {ppl[0]} / {ppl[1]} / {v['last_forget_rate']:.3f}"
            cells.append(f"**{text}**" if lr == chosen else text)
        lines.append(f"| `{method}` | " + " · ".join(cells) + f" | {entry['lr_rule']} |")
    lines += ["", f"![unlearning]({result['plot']})" if result.get("plot") else "", "", "Findings (unlearning):", ""]
    lines += [*result["findings"], ""]
    return lines


COLORS = {"ga": "tab:red", "npo": "tab:blue", "simnpo": "tab:green", "none": "tab:gray"}
STYLES = {"none": "-", "nll": "--", "kl": ":"}


PLOT_PPL_CAP = 1e4
"""The trade-off panels stop here: GA's collapse runs to 1e9 and would flatten every other curve (the table has it)."""


def _log_bars(stats: list[list[float]]) -> list[list[float]]:
    """Error bars of geometric mean g ×/÷ factor f on a log axis: down to g/f, up to g·f."""
    factor = [f if math.isfinite(f) else 1.0 for _, f in stats]
    return [[g - g / f for (g, _), f in zip(stats, factor)], [g * f - g for (g, _), f in zip(stats, factor)]]


def plot(result: dict, path: Path) -> None:
    """Retain perplexity vs forget rate per retain term (the trade-off), and forget rate vs step, test split."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from hf_align.io import atomic_file

    plain = FuncFormatter(lambda y, _: f"{y:g}")  # 3, 10, 1e+03 rather than 3×10⁰
    cfg, s, start = result["settings"], result["summary"], result["start"]["test"]
    n = len(cfg["seeds"])
    fig = Figure(figsize=(13, 10), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(2, 2, k + 1) for k in range(4)]
    for ax, retain in zip(axes, RETAINS):
        members = [m for m in ordered(result) if split_method(m)[1] == retain]
        for method in members:
            loss, _ = split_method(method)
            curve = s["methods"][method]["curve"]
            ax.errorbar(
                [p["forget_rate"][0] for p in curve], [p["perplexity"][0] for p in curve],
                xerr=[p["forget_rate"][1] for p in curve], yerr=_log_bars([p["perplexity"] for p in curve]),
                marker="o", markersize=3, capsize=2, color=COLORS[loss], linestyle="--" if method == CONTROL else "-",
                label=f"{_label(method)} (lr {s['methods'][method]['lr']:g})",
            )  # fmt: skip
        ax.plot([start["forget_rate"]], [start["perplexity"]], marker="*", markersize=12, color="black",
                linestyle="none", label="start model")  # fmt: skip
        for rate in s["targets"].values():
            ax.axvline(rate, color="gray", linewidth=0.8, linestyle=":")
            ax.annotate(f"{rate:.3f}", (rate, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="gray")  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylim(top=min(ax.get_ylim()[1], PLOT_PPL_CAP))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if ax.get_ylim()[1] < 150 else FuncFormatter(lambda y, _: ""))
        ax.invert_xaxis()
        ax.set_xlabel("forget rate (fraction of samples ending in ` ugh`; reversed: training moves right)")
        ax.set_ylabel(f"retain perplexity, answer digits (log scale, cut at {PLOT_PPL_CAP:g})")
        ax.set_title(f"trade-off, {RETAIN_NAMES[retain]} (a point every {cfg['eval_every']} steps)", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[3]
    for method in ordered(result):
        loss, retain = split_method(method)
        curve = s["methods"][method]["curve"]
        ax.errorbar(
            [p["step"] for p in curve], [p["forget_rate"][0] for p in curve], yerr=[p["forget_rate"][1] for p in curve],
            marker="o", markersize=3, capsize=2, color=COLORS[loss], linestyle="-." if method == CONTROL else STYLES[retain],
            label=_label(method),
        )  # fmt: skip
    ax.axhline(s["targets"]["fixed"], color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel("forget rate (fraction of samples ending in ` ugh`)")
    ax.set_title("forgetting along the run (line style: retain term)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"Unlearning ` ugh` on the testbed: {cfg['steps']} steps, each method at its held-out-chosen lr, test split\n"
        f"{n} seed(s): forget rate mean ± std, retain perplexity geometric mean ×/÷ geometric std",
        fontsize=11,
    )
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png")


def run_section(quick: bool, results: Path = RESULTS, seeds: list[int] | None = None, log=print) -> dict:
    """Run; write ``fidelity_unlearning[_quick].json`` and ``fidelity[_quick]_unlearning.png`` under ``results``."""
    return common.run_section(sys.modules[__name__], "unlearning", quick, results, seeds, log)


def refresh(result: dict) -> dict:
    """Summary and findings recomputed from the runs (after a change to the report code, no rerun needed)."""
    result["summary"] = summarize(result)
    result["findings"] = findings(result)
    return result


def rewrite(quick: bool, results: Path = RESULTS) -> dict:
    return common.rewrite_section(sys.modules[__name__], "unlearning", quick, results)


def main(argv: list[str] | None = None) -> int:
    return common.section_main(
        sys.modules[__name__],
        "unlearning",
        argv,
        lambda result: all(math.isfinite(v["last"]["forget_rate"][0]) for v in result["summary"]["methods"].values()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
