"""Does each method produce its paper's effect? Method-fidelity report on the testbed.

    python -m benchmarks.fidelity [--quick] [--seeds 0 1 2] [--jobs 2] [--rewrite]

Writes ``benchmarks/results/fidelity[_quick].md`` / ``.json`` and one PNG per section. Sections:

* **ALLO** (``benchmarks/fidelity/allo.py``): mask ablation, the four stages, row vs element and gradient vs
  weight-diff selection, mask ratios per stage; 5 seeds, one lr sweep for every variant.
* **unlearning** (``benchmarks/fidelity/unlearning.py``): NPO vs gradient ascent vs SimNPO, alone and with a retain
  term (NLL, KL), the forget/retain trade-off at equal forget rate.
* **AMA** (here): linear α between the start model (α = 1) and a DPO model (α = 0), partwise plans and the
  adaptive variant (its lr swept and chosen on held-out prompts; learned α per block); two seed sets.
* **adapters** (``benchmarks/fidelity/adapters.py``): Aligner vs its paper's baselines, one budget for all.
* **feedback** (here): Quark-style quantile conditioning.

Each section module also runs alone and writes its own JSON; this script runs them as subprocesses beside its own
AMA/feedback seeds (``--jobs`` processes at once, one torch thread each) and merges their JSON (``--rewrite`` only
merges). Metrics come from :mod:`hf_align.evaluation` (the ``hf-align eval`` functions): mean reward of one
temperature-1 sample per prompt (fixed prompts and sampling seed for every model), win rate and KL against the start
model on the same prompts, retain perplexity on ``tb.retain_dataset``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import ROOT, module_command
from benchmarks.fidelity.common import RESULTS, below, best_lr, fmt, mean_std, section_module
from hf_align import testbed
from hf_align.io import atomic_file, read_json, write_json
from hf_align.testbed import quiet_training_args


SECTIONS = ("allo", "adapters", "unlearning")
"""Section modules (``benchmarks.fidelity.<name>``), longest first: the scheduler starts them in this order."""
ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            seeds=[0], seed_sets=[[0]], feedback_seeds=[0], num_pairs=256, dpo_steps=20, dpo_lr=5e-4,
            eval_prompts=32, heldout_prompts=32, retain_rows=16, alphas=(0.0, 0.5, 1.0), fb_iterations=1,
            fb_steps=10, fb_prompts=32, ama_prompts=64, ama_steps=5, ama_lrs=[5e-2],
        )  # fmt: skip
    return dict(
        seeds=[0, 1, 2, 3, 4, 5], seed_sets=[[0, 1, 2], [3, 4, 5]], feedback_seeds=[0, 1, 2], num_pairs=512,
        dpo_steps=60, dpo_lr=5e-4, eval_prompts=256, heldout_prompts=128, retain_rows=128, alphas=ALPHAS,
        fb_iterations=4, fb_steps=150, fb_prompts=256, ama_prompts=512, ama_steps=60, ama_lrs=[1e-2, 3e-2, 1e-1],
    )  # fmt: skip


def allo_module():
    return section_module("allo")


# ---------------------------------------------------------------------------------------------------- AMA
def ama_sweep(tb, evaluator, dpo_model, alphas, tmp: str) -> list:
    from transformers import AutoModelForCausalLM

    from hf_align.merging import merge_models

    aligned = Path(tmp) / "dpo"
    dpo_model.save_pretrained(aligned)
    tb.tokenizer.save_pretrained(aligned)
    points = []
    for alpha in alphas:
        out = Path(tmp) / f"ama_{alpha:.1f}"
        merge_models(tb.path, aligned, out, alpha=alpha, progress=False)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        points.append({"alpha": alpha, **evaluator(merged)})
    return points


PARTWISE = {"partwise 0.4|0.3|0.2": "0.4|0.3|0.2", "partwise 0.2|0.3|0.4": "0.2|0.3|0.4"}
"""AMA's partwise plans on the testbed's 6 layers (pivots 1#3: layers 0-1, 2-3, 4-5), mean α 0.3 each."""
ADAPTIVE_INITS = (0.2, 0.4)


def best_of_n(tb, model, n: int, num_prompts: int, seed: int):
    """RAFT-style data from the aligned model, AMA's adaptive objective: the best of n samples per prompt."""
    from datasets import Dataset

    from hf_align.testbed.evaluation import eval_prompts, generate_completions

    prompts = eval_prompts(num_prompts, seed=10_000 + seed)  # not the evaluation prompts
    samples = [generate_completions(model, tb.tokenizer, prompts, seed=seed * 100 + k) for k in range(n)]
    rewards = [testbed.reward(prompts, s) for s in samples]
    best = [max(range(n), key=lambda k, i=i: rewards[k][i]) for i in range(len(prompts))]
    return Dataset.from_dict({"prompt": prompts, "completion": [samples[best[i]][i] for i in range(len(prompts))]})


def adaptive_merge(tb, data, aligned: Path, init: float, lr: float, seed: int, cfg: dict, tmp: str):
    """AMA's adaptive variant: per-block α's learned on ``data``, then merged like the linear sweep."""
    from transformers import AutoModelForCausalLM

    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer

    args = AdaptiveMergeConfig(**quiet_training_args(
        output_dir=f"{tmp}/adaptive_{init}_{lr:g}", init_val=init, mask_level="block3", learning_rate=lr,
        max_steps=cfg["ama_steps"], per_device_train_batch_size=16, lr_scheduler_type="constant",
        logging_steps=1000, seed=seed,
    ))  # fmt: skip
    trainer = AdaptiveMergeTrainer(
        AutoModelForCausalLM.from_pretrained(aligned), base_model=tb.path, args=args, train_dataset=data,
        processing_class=tb.tokenizer,
    )  # fmt: skip
    trainer.train()
    out = Path(tmp) / f"adaptive_{init}_{lr:g}_merged"
    trainer.merge(out, base=tb.path, aligned=aligned, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return merged, [round(a, 3) for a in trainer.learned_alphas().block_alphas]


def ama_variants(tb, evaluator, dpo_model, seed: int, cfg: dict, tmp: str, chosen: dict | None = None) -> list:
    """Partwise plans and adaptive α's (learned on best-of-4 samples of the DPO model), merged like the linear sweep.

    The adaptive variant is the one trained here: without ``chosen`` (the first seed) every lr of ``cfg["ama_lrs"]``
    is tried and the one with the highest held-out reward kept; later seeds rerun ``chosen[init]``.
    """
    from transformers import AutoModelForCausalLM

    from hf_align.merging import merge_models, partwise_plan

    aligned = Path(tmp) / "dpo"  # written by ama_sweep
    points = []
    for label, alphas in PARTWISE.items():
        out = Path(tmp) / label.replace(" ", "_").replace("|", "-")
        merge_models(
            tb.path, aligned, out, progress=False,
            plan=lambda names, config, alphas=alphas: partwise_plan(
                names, "1#3", alphas, num_layers=config.get("num_hidden_layers")
            ),
        )  # fmt: skip
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        points.append({"name": label, "mean_alpha": 0.3, **evaluator(merged)})
    data = best_of_n(tb, dpo_model, n=4, num_prompts=cfg["ama_prompts"], seed=seed)
    for init in ADAPTIVE_INITS:
        lrs = [f"{lr:g}" for lr in cfg["ama_lrs"]] if chosen is None else [chosen[f"{init:g}"]]
        trained = {lr: adaptive_merge(tb, data, aligned, init, float(lr), seed, cfg, tmp) for lr in lrs}
        sweep = {lr: evaluator.heldout(model) for lr, (model, _) in trained.items()} if chosen is None else {}
        lr = best_lr(sweep) if sweep else lrs[0]
        model, learned = trained[lr]
        point = {"name": f"adaptive init {init}", "mean_alpha": init, "lr": lr, "block_alphas": learned}
        points.append({**point, **({"heldout_sweep": sweep} if sweep else {}), **evaluator(model)})
    return points


def feedback_quantile(tb, evaluator, seed: int, cfg: dict, out: str) -> list:
    """Quark-style quantile feedback: reward of samples conditioned on the best vs the worst bin, per iteration.

    "Worst" is the worst bin that holds pool rows at that moment: tied scores share a bin, so with many
    zero-reward samples the last bin stays empty and its token is never trained (conditioning on it says
    nothing about the method). "bare" is the bare prompt, no feedback token: at step 0 it is the start model.
    The trainer adds the quantile tokens to its tokenizer, so it gets a fresh one: reusing a tokenizer that
    already has them with a fresh model copy fails (the embeddings are not resized for tokens already present).
    """
    from transformers import TrainerCallback

    from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer

    config = FeedbackConditionedConfig(**quiet_training_args(
        output_dir=out, seed=seed,
        num_rounds=cfg["fb_iterations"], steps_per_round=cfg["fb_steps"],
        prompts_per_round=cfg["fb_prompts"], num_generations=4, max_completion_length=6, per_device_train_batch_size=32,
        learning_rate=1e-3, lr_scheduler_type="constant", beta=0.0, num_quantiles=5,
        feedback_template="{feedback}{prompt}", logging_steps=1000,
    ))  # fmt: skip
    prompts = evaluator.prompts
    points: list[dict] = []

    def reward(**condition) -> float:
        return statistics.fmean(testbed.reward(prompts, trainer.generate(prompts, seed=1234, **condition)))

    class PerIteration(TrainerCallback):
        def record(self, step):
            counts = trainer.pool.bin_counts() if len(trainer.pool) else np.ones(config.num_quantiles)
            worst = int(np.flatnonzero(counts)[-1])
            row = {
                "step": step, "reward_best": reward(feedback=0), "reward_worst": reward(feedback=worst),
                "worst_bin": worst, "reward_bare": reward(unconditioned=True),
            }  # fmt: skip
            if trainer.iteration_timings:
                row["pool_mean_score"] = trainer.iteration_timings[-1]["mean_score"]
            points.append(row)

        def on_train_begin(self, args, state, control, **kwargs):
            self.record(0)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % config.steps_per_round == 0:
                self.record(state.global_step)

    trainer = FeedbackConditionedTrainer(
        copy.deepcopy(tb.model), config, tb.prompt_dataset(2048), processing_class=testbed.load_tokenizer(),
        reward_funcs=testbed.reward, callbacks=[PerIteration()],
    )  # fmt: skip
    trainer.train()
    return points


# ------------------------------------------------------------------------------------------- this file's seeds
def run_seed(tb, evaluator, seed: int, cfg: dict, tmp: str, chosen: dict | None) -> dict:
    """AMA (and, for the feedback seeds, Quark) on one seed; ``chosen``: the adaptive lrs the first seed picked."""
    t0 = time.time()
    exclude = set(evaluator.prompts) | set(evaluator.heldout_prompts)
    data = allo_module().preference_pairs(tb, cfg["num_pairs"], seed, exclude)
    result = {"seed": seed, "timings_s": {}}

    def timed(name, fn):
        start = time.time()
        value = fn()
        result["timings_s"][name] = round(time.time() - start, 1)
        return value

    dpo = timed(
        "dpo", lambda: allo_module().train_dpo(tb, data, seed, cfg["dpo_steps"], f"{tmp}/dpo_train", cfg["dpo_lr"])
    )
    result["ama"] = timed("ama", lambda: ama_sweep(tb, evaluator, dpo, cfg["alphas"], tmp))
    result["ama_variants"] = timed(
        "ama_variants", lambda: ama_variants(tb, evaluator, dpo, seed, cfg, tmp, chosen=chosen)
    )
    if "feedback" in cfg["sections"] and seed in cfg["feedback_seeds"]:
        result["feedback"] = timed("feedback", lambda: feedback_quantile(tb, evaluator, seed, cfg, f"{tmp}/feedback"))
    result["timings_s"]["total"] = round(time.time() - t0, 1)
    print(f"seed {seed} done in {result['timings_s']['total']:.0f}s", flush=True)
    return result


def adaptive_lrs(run: dict) -> dict[str, str]:
    """The adaptive lrs the first seed chose, per init."""
    return {f"{p['mean_alpha']:g}": p["lr"] for p in run["ama_variants"] if "lr" in p}


# ------------------------------------------------------------------------------------------------ sections
class Sections:
    """The section scripts as subprocesses, at most ``slots`` at once (the caller reserves one while it trains)."""

    def __init__(self, names: list[str], quick: bool, seeds: list[int] | None, results: Path, logs: Path):
        self.pending = [n for n in SECTIONS if n in names]
        self.running: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.returncodes: dict[str, int] = {}
        self.quick, self.seeds, self.results, self.logs = quick, seeds, results, logs

    def command(self, name: str) -> list[str]:
        cmd = module_command(f"fidelity.{name}", "--results", str(self.results))
        return cmd + (["--quick"] if self.quick else []) + (["--seeds", *map(str, self.seeds)] if self.seeds else [])

    def poll(self, slots: int) -> None:
        for name, (proc, log) in list(self.running.items()):
            if proc.poll() is not None:
                self.returncodes[name] = proc.returncode
                del self.running[name]
                print(f"section {name} finished (exit {proc.returncode}); log: {log}", flush=True)
                if proc.returncode:
                    print(log.read_text()[-3000:], flush=True)
        while self.pending and len(self.running) < slots:
            name = self.pending.pop(0)
            log = self.logs / f"{name}.log"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            with open(log, "w") as handle:
                proc = subprocess.Popen(self.command(name), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            self.running[name] = (proc, log)
            print(f"section {name} started: {' '.join(self.command(name))}", flush=True)

    def wait(self, slots: int) -> dict[str, int]:
        while self.pending or self.running:
            self.poll(slots)
            time.sleep(1)
        return self.returncodes


def load_sections(names: list[str], quick: bool, results: Path) -> dict:
    """Each section's newest JSON, its summary and findings recomputed by its module (what ``--rewrite`` merges)."""
    suffix = "_quick" if quick else ""
    out = {}
    for name in names:
        path = results / f"fidelity_{name}{suffix}.json"
        if path.exists():
            out[name] = section_module(name).refresh(read_json(path))
    return out


# -------------------------------------------------------------------------------------------------- report
def seed_sets(runs: list[dict], cfg: dict) -> dict[str, list[dict]]:
    """The AMA seed sets that have runs: label → runs (a stopped run reports the seeds it finished)."""
    by_seed = {r["seed"]: r for r in runs}
    sets = {}
    for seeds in cfg.get("seed_sets", [cfg["seeds"]]):
        done = [by_seed[s] for s in seeds if s in by_seed]
        if done:
            sets[f"seeds {done[0]['seed']}–{done[-1]['seed']}" if len(done) > 1 else f"seed {done[0]['seed']}"] = done
    return sets


def summarize(runs: list[dict], cfg: dict) -> dict:
    keys = ("mean_reward", "perplexity", "kl")
    summary: dict = {"ama": {}, "ama_variants": {}, "block_alphas": {}}
    for label, group in seed_sets(runs, cfg).items():
        summary["ama"][label] = {
            f"{p['alpha']:.1f}": {k: mean_std([r["ama"][i][k] for r in group]) for k in keys}
            for i, p in enumerate(group[0]["ama"])
        }
        summary["ama_variants"][label] = {
            p["name"]: {k: mean_std([r["ama_variants"][i][k] for r in group]) for k in keys}
            for i, p in enumerate(group[0]["ama_variants"])
        }
        summary["block_alphas"][label] = {
            p["name"]: [mean_std([r["ama_variants"][i]["block_alphas"][b] for r in group]) for b in range(3)]
            for i, p in enumerate(group[0]["ama_variants"])
            if "block_alphas" in p
        }
    feedback = [r for r in runs if "feedback" in r]
    if feedback:
        summary["feedback"] = [
            {
                "step": p["step"],
                **{
                    k: mean_std([r["feedback"][i][k] for r in feedback])
                    for k in ("reward_best", "reward_worst", "reward_bare")
                },
            }
            for i, p in enumerate(feedback[0]["feedback"])
        ]
        summary["feedback_seeds"] = [r["seed"] for r in feedback]
    return summary


def plots(summary: dict, suffix: str, results: Path) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        with atomic_file(results / name) as handle:
            fig.savefig(handle, format="png")
        written.append(name)

    if "feedback" in summary:
        fig = Figure(figsize=(5, 3.5), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        for key, label in (
            ("reward_best", "conditioned on best bin"),
            ("reward_worst", "conditioned on worst populated bin"),
            ("reward_bare", "bare prompt (no feedback)"),
        ):
            curve = summary["feedback"]
            ax.errorbar(
                [p["step"] for p in curve], [p[key][0] for p in curve], yerr=[p[key][1] for p in curve],
                label=label, marker="o", capsize=2,
            )  # fmt: skip
        ax.set_xlabel("training step")
        ax.set_ylabel("mean sampled reward")
        ax.set_title(f"Quark quantile feedback, seeds {summary['feedback_seeds']}", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, f"fidelity{suffix}_feedback.png")

    sets = list(summary["ama"])
    fig = Figure(figsize=(5 * len(sets), 4), dpi=100)
    for k, label in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), k + 1)
        linear = summary["ama"][label]
        ax.errorbar(
            [v["perplexity"][0] for v in linear.values()], [v["mean_reward"][0] for v in linear.values()],
            xerr=[v["perplexity"][1] for v in linear.values()], yerr=[v["mean_reward"][1] for v in linear.values()],
            marker="o", capsize=2, label="linear α",
        )  # fmt: skip
        for alpha, v in linear.items():
            ax.annotate(
                f"α={alpha}", (v["perplexity"][0], v["mean_reward"][0]), fontsize=7, xytext=(3, 3),
                textcoords="offset points",
            )  # fmt: skip
        for (name, v), marker in zip(summary["ama_variants"][label].items(), ("s", "D", "^", "v", "P")):
            ax.errorbar(
                v["perplexity"][0], v["mean_reward"][0], xerr=v["perplexity"][1], yerr=v["mean_reward"][1],
                marker=marker, linestyle="none", capsize=2, label=name,
            )  # fmt: skip
        ax.legend(fontsize=7)
        ax.set_xlabel("retain perplexity (lower is better)")
        ax.set_ylabel("mean sampled reward")
        ax.set_title(f"AMA: α·start + (1−α)·DPO, {label}", fontsize=9)
    save(fig, f"fidelity{suffix}_ama_pareto.png")
    return written


def _ama_lines(report: dict) -> list[str]:
    runs, summary, cfg = report["runs"], report["summary"], report["settings"]
    sets = list(summary["ama"])
    first = runs[0]
    lines = [
        "## AMA: merging the start model (α = 1) and a DPO model (α = 0)",
        "",
        f"The DPO model: `trl.DPOTrainer`, {cfg['dpo_steps']} steps, lr {cfg['dpo_lr']:g}, {cfg['num_pairs']} pairs "
        "per seed (no test or held-out prompt among them). Linear α through `hf_align.merging.merge_models`; "
        "partwise: one α per part of the 6 layers (0–1 | 2–3 | 4–5; embeddings take the first part's α, the head "
        f"the last's); adaptive: per-block α's (block3: layers 0–1, 2–3, 4–5) learned for {cfg['ama_steps']} steps, "
        f"ε = 0.2, on best-of-4 samples of the DPO model for {cfg['ama_prompts']} prompts, the mean α fixed at its "
        f"init. The adaptive lr was chosen per init from {cfg['ama_lrs']} on seed {first['seed']} by the highest "
        f"held-out reward ({cfg['heldout_prompts']} prompts disjoint from the test prompts): "
        + ", ".join(
            f"init {p['mean_alpha']:g} → **{p['lr']}** ("
            + " · ".join(f"{lr}: {r:.3f}" for lr, r in p.get("heldout_sweep", {}).items())
            + ")"
            for p in first["ama_variants"]
            if "lr" in p
        )
        + f". Two seed sets, {' and '.join(sets)}, each mean ± std: the second checks that the first's conclusions "
        "replicate.",
        "",
        "| α | " + " | ".join(f"reward ({s}) | retain ppl ({s}) | KL ({s})" for s in sets) + " |",
        "|---|" + "---|---|---|" * len(sets),
    ]
    for alpha in summary["ama"][sets[0]]:
        cells = []
        for s in sets:
            v = summary["ama"][s][alpha]
            cells += [fmt(v["mean_reward"], 3), fmt(v["perplexity"], 2), fmt(v["kl"], 2)]
        lines.append(f"| {alpha} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | mean α | " + " | ".join(f"reward ({s}) | retain ppl ({s})" for s in sets) + " |"]
    lines.append("|---|---|" + "---|---|" * len(sets))
    for name in summary["ama_variants"][sets[0]]:
        mean_alpha = next(p["mean_alpha"] for p in first["ama_variants"] if p["name"] == name)
        cells = []
        for s in sets:
            v = summary["ama_variants"][s][name]
            cells += [fmt(v["mean_reward"], 3), fmt(v["perplexity"], 2)]
        lines.append(f"| {name.replace('|', chr(92) + '|')} | {mean_alpha:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Learned α per block (α weighs the start model; block 0 = layers 0–1 with the embeddings, block 2 = layers "
        "4–5 with the head), mean ± std:",
        "",
        "| variant | seed set | block 0 | block 1 | block 2 |",
        "|---|---|---|---|---|",
    ]
    for s in sets:
        for name, blocks in summary["block_alphas"][s].items():
            lines.append(f"| {name} | {s} | " + " | ".join(fmt(b, 3) for b in blocks) + " |")
    return lines


def _feedback_lines(report: dict) -> list[str]:
    summary, cfg, runs = report["summary"], report["settings"], report["runs"]
    lines = [
        "## Feedback-conditioned training (Quark-style quantiles, 5 bins)",
        "",
        f"{cfg['fb_iterations']} iterations × {cfg['fb_steps']} steps, {cfg['fb_prompts']} prompts × 4 samples per "
        "iteration, batch 32, lr 1e-3 constant, no KL; seeds "
        f"{summary['feedback_seeds']}. Reward of samples conditioned on the best bin (0), on the worst bin that holds "
        "pool rows (tied zero rewards leave bin 4 empty), and on the bare prompt; step 0 is the start model. "
        '"pool" is the mean reward of the samples the loop itself drew in that iteration (conditioned on the best '
        "bin from the second iteration on).",
        "",
        "| step | reward given best bin | given worst populated bin | bare prompt | pool samples |",
        "|---|---|---|---|---|",
    ]
    fb_runs = [r for r in runs if "feedback" in r]
    for i, p in enumerate(summary["feedback"]):
        cells = [fmt(p[k]) for k in ("reward_best", "reward_worst", "reward_bare")]
        pool = [r["feedback"][i]["pool_mean_score"] for r in fb_runs if "pool_mean_score" in r["feedback"][i]]
        cells.append(fmt(mean_std(pool)) if pool else "–")
        lines.append(f"| {p['step']} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict, suffix: str) -> str:
    cfg, sections = report["settings"], report.get("sections", {})
    lines = [
        f"# Method fidelity on the testbed{' (quick)' if report['quick'] else ''}",
        "",
        f"Generated by `python -m benchmarks.fidelity{' --quick' if report['quick'] else ''}` in "
        f"{report['wall_s'] / 60:.1f} min on CPU ({report['jobs']} processes, {report['torch_threads']} torch "
        "thread each): this file's seeds (AMA, feedback) and the section scripts side by side. Every section uses "
        "the same test prompts (fixed sampling seed) and, where it chooses a learning rate, held-out prompts "
        "disjoint from them. Reward: mean testbed reward of one temperature-1 sample per prompt; win rate and KL "
        "against the start model's samples on the same prompts (`hf_align.evaluation`); retain perplexity on "
        f"{cfg['retain_rows']} rows of `tb.retain_dataset` (completion + EOS given the prompt) unless a section says "
        "otherwise. Verdicts: *shown* when the means differ the claimed way by more than the two stds together, "
        "*shown not to hold* when they differ the other way by as much, *not shown* otherwise.",
        "",
    ]
    if "allo" in sections:
        lines += [*allo_module().markdown(sections["allo"]), ""]
    if "unlearning" in sections:
        lines += [*section_module("unlearning").markdown(sections["unlearning"]), ""]
    lines += [*_ama_lines(report), "", "Findings (AMA):", "", *report["findings"]["ama"], ""]
    if "adapters" in sections:
        lines += [*section_module("adapters").markdown(sections["adapters"]), ""]
    if "feedback" in report["summary"]:
        lines += [*_feedback_lines(report), "", "Findings (feedback):", "", *report["findings"]["feedback"], ""]
    if report.get("real_model"):
        lines += [*section_module("real_model").markdown(report["real_model"]), ""]
    missing = [name for name in report.get("planned_sections", []) if name not in sections]
    lines += [
        "## Not shown here / caveats",
        "",
        "- The budgets are minutes on CPU on a 1.25M-parameter testbed model, far below the papers'; a verdict here "
        "is about this testbed, not about the methods at scale.",
        "- Feedback conditioning puts a new token in front of every prompt, a context the tiny testbed model never saw: "
        "alone it lowers the reward (~0.37 → ~0.24 untrained), so the loop first wins that back. Shorter runs "
        "(≤ 100 steps per iteration, pools of a few hundred samples) end *below* the start model.",
        *(f"- Section `{name}` did not finish in this run: see its log." for name in missing),
        "",
        "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"]),
        "",
    ]
    return "\n".join(lines)


def _dominated(ama: dict) -> tuple[list[str], list[str]]:
    keys = sorted(ama, key=float)
    rewards = [ama[k]["mean_reward"][0] for k in keys]
    ppls = [ama[k]["perplexity"][0] for k in keys]
    dominated = [
        k for i, k in enumerate(keys)
        if any(rewards[j] >= rewards[i] and ppls[j] <= ppls[i] and (rewards[j], ppls[j]) != (rewards[i], ppls[i]) for j in range(len(keys)))
    ]  # fmt: skip
    return keys, dominated


def _versus_front(ama: dict, variant: dict) -> tuple[str, str]:
    """The best linear α at no higher retain perplexity and the verdict for "the variant beats it".

    "No higher" allows the variant's own perplexity spread (a linear α 0.01 above the variant's mean perplexity is
    not out of reach); the curve is not monotone, so no interpolation. None reachable: the lowest-perplexity α.
    """
    ppl, spread = variant["perplexity"]
    reachable = [k for k in ama if ama[k]["perplexity"][0] <= ppl + spread]
    reachable = reachable or [min(ama, key=lambda k: ama[k]["perplexity"][0])]
    best = max(reachable, key=lambda k: ama[k]["mean_reward"][0])
    if below(ama[best]["mean_reward"], variant["mean_reward"]):
        return best, "shown"
    return best, "shown not to hold" if below(variant["mean_reward"], ama[best]["mean_reward"]) else "not shown"


def ama_findings(summary: dict) -> list[str]:
    out, verdicts = [], {}
    for label, ama in summary["ama"].items():
        keys, dominated = _dominated(ama)
        out.append(
            f"- **Linear AMA trades reward for retain perplexity along a front ({label}).** Reward "
            f"{ama[keys[-1]]['mean_reward'][0]:.3f} (α=1, start) → {ama[keys[0]]['mean_reward'][0]:.3f} (α=0, DPO), "
            f"retain perplexity {ama[keys[-1]]['perplexity'][0]:.2f} → {ama[keys[0]]['perplexity'][0]:.2f}; "
            + (
                f"dominated α's: {dominated}, the front: {[k for k in keys if k not in dominated]}."
                if dominated
                else "no α is dominated."
            )
        )
        parts = []
        for name, v in summary["ama_variants"][label].items():
            best, verdict = _versus_front(ama, v)
            verdicts.setdefault(name, []).append(verdict)
            parts.append(
                f"{name} {fmt(v['mean_reward'])} at ppl {v['perplexity'][0]:.2f} vs linear α={best} "
                f"{fmt(ama[best]['mean_reward'])} (ppl {ama[best]['perplexity'][0]:.2f}): {verdict}"
            )
        out.append(
            f"- **AMA variants beat the linear front at no higher retain perplexity, within the variant's spread ({label}):** "
            + "; ".join(parts)
            + "."
        )
    if len(summary["ama"]) > 1:
        agree = [n for n, v in verdicts.items() if len(set(v)) == 1]
        differ = [f"{n} ({' / '.join(v)})" for n, v in verdicts.items() if len(set(v)) > 1]
        out.append(
            "- **Replication across the seed sets:** the same verdict in both for "
            + (", ".join(agree) or "no variant")
            + (f"; different verdicts for {', '.join(differ)}." if differ else ".")
        )
    for label, blocks in summary["block_alphas"].items():
        out.append(
            f"- **Learned α's ({label}):** "
            + "; ".join(f"{name}: " + " | ".join(f"{b[0]:.3f}" for b in bs) for name, bs in blocks.items())
            + " (blocks 0 | 1 | 2; a higher α keeps more of the start model in that block)."
        )
    return out


def feedback_findings(summary: dict) -> list[str]:
    fb, n = summary["feedback"], len(summary["feedback_seeds"])
    start, best, worst = fb[0]["reward_bare"], fb[-1]["reward_best"], fb[-1]["reward_worst"]
    beats = "shown" if below(start, best) else "shown not to hold" if below(best, start) else "not shown"
    split = "shown" if below(worst, best) else "not shown"
    if n < 2:
        beats = split = "not shown (a single seed)"
    return [
        f"- **Conditioning on the best bin beats the start model (Quark) — {beats}.** After {fb[-1]['step']} steps: "
        f"best bin {fmt(best, 3, n)}, start model {fmt(start, 3, n)}.",
        f"- **The feedback token steers the reward (best bin > worst populated bin) — {split}.** {fmt(best, 3, n)} "
        f"vs {fmt(worst, 3, n)}.",
    ]


def findings(summary: dict) -> dict[str, list[str]]:
    """Plain-language statements computed from the summary (so the Markdown never claims what the numbers don't)."""
    out = {"ama": ama_findings(summary)}
    if "feedback" in summary:
        out["feedback"] = feedback_findings(summary)
    return out


# ---------------------------------------------------------------------------------------------------- main
def write_report(
    runs: list[dict],
    cfg: dict,
    quick: bool,
    wall_s: float,
    results: Path,
    jobs: int,
    finished: list[str] | None = None,
) -> dict:
    """``finished``: the sections this run completed (None: every section JSON on disk, what ``--rewrite`` merges); a
    section that failed or has not finished yet is left out, never replaced by an older run's JSON."""
    names = cfg["sections"] if finished is None else [n for n in cfg["sections"] if n in finished]
    sections = load_sections(names, quick, results)
    summary = summarize(runs, cfg)
    suffix = "_quick" if quick else ""
    report = {
        "quick": quick,
        "settings": {**cfg, "alphas": list(cfg["alphas"])},
        "torch_threads": 1,
        "jobs": jobs,
        "runs": runs,
        "summary": summary,
        "findings": findings(summary),
        "wall_s": wall_s,
        "planned_sections": [n for n in SECTIONS if n in cfg["sections"]],
        "seeds_completed": [r["seed"] for r in runs],
    }
    report["plots"] = plots(summary, suffix, results)
    for name, section in sections.items():
        section_module(name).plot(section, results / section["plot"])
        report["plots"].append(section["plot"])
    write_json(results / f"fidelity{suffix}.json", {**report, "sections": {n: s["plot"] for n, s in sections.items()}})
    real = results / f"fidelity_real_model{suffix}.json"  # its own run (python -m benchmarks.fidelity.real_model)
    if real.exists():
        report["real_model"] = read_json(real)
        report["plots"].append(report["real_model"]["plot"])
    text = markdown({**report, "sections": sections}, suffix)
    with atomic_file(results / f"fidelity{suffix}.md", "w") as handle:
        handle.write(text)
    return {**report, "sections": sections, "markdown": text}


def run_seeds(cfg: dict, sections: Sections, jobs: int) -> list[dict]:
    """This file's seeds, in this process, while the section scripts use the other slots."""
    tb = testbed.load()
    evaluator = allo_module().Evaluator(tb, cfg["eval_prompts"], cfg["retain_rows"], cfg["heldout_prompts"])
    runs: list[dict] = []
    for seed in cfg["seeds"]:
        sections.poll(jobs - 1)
        with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
            runs.append(run_seed(tb, evaluator, seed, cfg, tmp, adaptive_lrs(runs[0]) if runs else None))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps and prompts (CI smoke, < 2 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds of every section")
    parser.add_argument(
        "--sections", nargs="*", default=[*SECTIONS, "feedback"], choices=[*SECTIONS, "feedback"],
        help="sections on top of AMA (the section scripts run as subprocesses)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="processes at once, one torch thread each")
    parser.add_argument("--rewrite", action="store_true", help="only rebuild the report from the JSON files")
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    if args.rewrite:
        old = read_json(RESULTS / f"fidelity{suffix}.json")
        report = write_report(old["runs"], old["settings"], args.quick, old["wall_s"], RESULTS, old["jobs"])
        print(report["markdown"])
        return 0
    cfg = settings(args.quick)
    if args.seeds:
        cfg["seeds"], cfg["seed_sets"] = args.seeds, [args.seeds]
        cfg["feedback_seeds"] = args.seeds[: len(cfg["feedback_seeds"])]
    cfg["sections"] = args.sections
    # One thread per process: on a shared 2-core machine two-thread OpenMP runs slowed down up to 100x
    # (spin-waiting) while other jobs ran; one thread degrades gracefully.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.time()
    jobs = max(1, args.jobs)
    with tempfile.TemporaryDirectory(prefix="fidelity-logs-") as logs:
        sections = Sections([n for n in args.sections if n in SECTIONS], args.quick, args.seeds, RESULTS, Path(logs))
        sections.poll(jobs - 1)
        runs = run_seeds(cfg, sections, jobs)
        done = [n for n, rc in sections.returncodes.items() if rc == 0]
        write_report(runs, cfg, args.quick, time.time() - start, RESULTS, jobs, done)  # a killed run keeps these
        returncodes = sections.wait(jobs)
    done = [n for n, rc in returncodes.items() if rc == 0]
    report = write_report(runs, cfg, args.quick, time.time() - start, RESULTS, jobs, done)
    print(report["markdown"])
    print(f"wrote {RESULTS}/fidelity{suffix}.json and .md in {(time.time() - start) / 60:.1f} min")
    finite = all(math.isfinite(v["mean_reward"][0]) for s in report["summary"]["ama"].values() for v in s.values())
    return 0 if finite and not any(returncodes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
