"""Does each method produce its paper's effect? Method-fidelity report on the testbed.

    python benchmarks/fidelity.py [--quick] [--seeds 0 1 2]

Full mode: 3 seeds (each seed draws a different preference set and data order); ``--quick``: 1 seed,
fewer steps and prompts (CI smoke, < 2 min). Sections:

* **mask ablation** (ALLO): trl.DPOTrainer vs MaskedDPOTrainer with the top-10 % rows of a 20-step
  warm-up's accumulated gradients, a random 10 % and the bottom 10 % (same steps, batch, data).
* **NPO vs gradient ascent** on ``tb.forget_dataset``: forget-behaviour rate and retain perplexity
  every few steps (no retain term in either, same optimiser, lr and steps; gradient ascent is the
  plain NLL ascent written out here, NPO's β → 0 limit).
* **AMA**: linear α ∈ {0, .2, …, 1} between the start model (α = 1) and the DPO model (α = 0) through
  ``hf_align.merging.merge_models``: reward vs retain perplexity (the Pareto plot).
* **adapters** (Aligner vs its paper's baselines, one budget for all): ``benchmarks/fidelity_adapters.py``, run once
  after the seeds (it sweeps lrs and runs its own seeds); it also runs alone, and ``--rewrite`` merges its JSON.

Metrics come from :mod:`hf_align.evaluation` (the ``hf-align eval`` functions): mean reward of one
temperature-1 sample per prompt (fixed prompts and sampling seed for every model), win rate and KL
against the start model on the same prompts, retain perplexity on ``tb.retain_dataset``.
Writes ``benchmarks/results/fidelity[_quick].json``, ``fidelity[_quick].md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_align import testbed
from hf_align.evaluation import evaluate_model, perplexity
from hf_align.io import atomic_file, write_json
from hf_align.testbed.evaluation import eval_prompts


RESULTS = Path(__file__).resolve().parent / "results"


def adapters_module():
    """``benchmarks/fidelity_adapters.py`` (the adapters section), loaded by path: ``benchmarks`` is not a package."""
    import importlib.util
    import sys

    if "fidelity_adapters" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fidelity_adapters", Path(__file__).with_name("fidelity_adapters.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fidelity_adapters"] = module
        spec.loader.exec_module(module)
    return sys.modules["fidelity_adapters"]


ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            seeds=[0], num_pairs=256, warmup_steps=8, dpo_steps=20, npo_steps=10, npo_eval_every=5,
            eval_prompts=64, retain_rows=32, alphas=(0.0, 0.5, 1.0), fb_iterations=1, fb_steps=10, fb_prompts=32,
            allo_forget_steps=5, allo_forget_lr=2e-4, ama_prompts=64, ama_steps=5, ama_lr=5e-2,
        )  # fmt: skip
    return dict(
        seeds=[0, 1, 2], num_pairs=512, warmup_steps=20, dpo_steps=60, npo_steps=40, npo_eval_every=5,
        eval_prompts=256, retain_rows=128, alphas=ALPHAS, fb_iterations=4, fb_steps=150, fb_prompts=256,
        allo_forget_steps=20, allo_forget_lr=2e-4, ama_prompts=512, ama_steps=60, ama_lr=5e-2,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- metrics
class Evaluator:
    """Every model is scored on the same prompts with the same sampling seed; reference = the start model."""

    def __init__(self, tb, num_prompts: int, retain_rows: int):
        self.tb = tb
        self.start = copy.deepcopy(tb.model).eval()
        self.prompts = eval_prompts(num_prompts, seed=1234)
        retain = tb.retain_dataset(retain_rows)
        self.retain = {"prompts": list(retain["prompt"]), "completions": list(retain["completion"])}

    def __call__(self, model) -> dict:
        r = evaluate_model(
            model, self.tb.tokenizer, self.prompts, [testbed.reward], ["testbed"], reference_model=self.start,
            retain=self.retain, seed=1234, max_new_tokens=10,
        )  # fmt: skip
        keys = ("mean_reward", "win_rate", "kl", "perplexity", "mean_length")
        return {k: r[k] for k in keys}

    def forget(self, model) -> dict:
        r = self.tb.mean_reward(model, prompts=self.prompts, seed=1234)
        ppl = perplexity(model, self.tb.tokenizer, self.retain["prompts"], self.retain["completions"])
        return {"forget_rate": r["forget_rate"], "mean_reward": r["mean_reward"], "perplexity": ppl["perplexity"]}


# -------------------------------------------------------------------------------------------- training
def _dpo_common(output_dir: str, steps: int, seed: int) -> dict:
    return dict(
        output_dir=output_dir, per_device_train_batch_size=16, max_steps=steps, beta=0.1,
        lr_scheduler_type="constant", logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, seed=seed, disable_tqdm=True,
    )  # fmt: skip


def train_dpo(tb, data, seed: int, steps: int, out: str, lr: float = 5e-4, callbacks=None):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(learning_rate=lr, **_dpo_common(out, steps, seed))
    trainer = DPOTrainer(
        model=copy.deepcopy(tb.model), ref_model=copy.deepcopy(tb.model), args=config, train_dataset=data,
        processing_class=tb.tokenizer, callbacks=callbacks or [],
    )  # fmt: skip
    trainer.train()
    return trainer.model.eval()


def warmup_scores(tb, data, seed: int, steps: int, out: str) -> dict:
    """ALLO's warm-up in miniature: DPO with MaskAccumulationCallback accumulating |grad| per row."""
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.scores import load_scores

    callback = MaskAccumulationCallback(method="gradient", granularity="row")
    train_dpo(tb, data, seed, steps, out, callbacks=[callback])
    scores, _ = load_scores(out)
    return scores


def train_masked(tb, data, seed: int, steps: int, out: str, mask, lr: float = 2e-3, model=None):
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer
    from hf_align.trainers._model_copy import independent_copy

    config = MaskedDPOConfig(learning_rate=lr, **_dpo_common(out, steps, seed))
    trainer = MaskedDPOTrainer(
        model=independent_copy(model if model is not None else tb.model), args=config, train_dataset=data,
        processing_class=tb.tokenizer, neuron_mask=mask,
    )  # fmt: skip
    trainer.train()
    return trainer.model.eval()


def allo_pipeline(tb, data, seed: int, cfg: dict, scores: dict, out: str):
    """ALLO end to end in miniature, the stages of recipes/allo/pipeline.yaml: the warm-up's scores give a forgetting
    mask (top 5 %) and an improving mask (top 10 %); rewrite-diff labels mark the tokens where a rejected answer
    differs from the chosen one; token-level NPO forgets those tokens (forgetting mask only), then MaskedDPO improves
    from the forgetting stage's model (improving mask only)."""
    from hf_align.key_tokens import label_dataset
    from hf_align.masks import NeuronMask
    from hf_align.sparse_update import merge_deltas
    from hf_align.trainers import NPOConfig, NPOTrainer

    forget_mask = NeuronMask.from_scores(scores, 0.05, select="top")
    improve_mask = NeuronMask.from_scores(scores, 0.1, select="top")
    labelled = label_dataset(data, tb.tokenizer, "rewrite_diff")
    config = NPOConfig(
        output_dir=f"{out}/forget", per_device_train_batch_size=16, max_steps=cfg["allo_forget_steps"],
        learning_rate=cfg["allo_forget_lr"], weight_decay=0.0, lr_scheduler_type="constant", beta=0.1,
        npo_level="token", precompute_ref_log_probs=True, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, logging_steps=1000, seed=seed,
    )  # fmt: skip
    trainer = NPOTrainer(
        copy.deepcopy(tb.model), args=config, train_dataset=labelled, processing_class=tb.tokenizer,
        neuron_mask=forget_mask,
    )  # fmt: skip
    trainer.train()
    forgot = merge_deltas(trainer.model).eval()
    return train_masked(tb, data, seed, cfg["dpo_steps"], f"{out}/improve", improve_mask, model=forgot)


def _forget_batches(tb, forget, batch_size: int, steps: int, seed: int):
    """Deterministic forget batches: (input_ids, attention_mask, labels) with the prompt masked, EOS appended."""
    tok = tb.tokenizer
    rows = []
    for prompt, completion in zip(forget["prompt"], forget["completion"]):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        length = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), length), tok.pad_token_id)
        labels = torch.full((len(idx), length), -100)
        attn = torch.zeros((len(idx), length), dtype=torch.long)
        for j, i in enumerate(idx):
            seq, lab = rows[i]
            ids[j, : len(seq)], labels[j, : len(seq)], attn[j, : len(seq)] = torch.tensor(seq), torch.tensor(lab), 1
        yield ids, attn, labels


def _sequence_logps(model, ids, attn, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = labels[:, 1:]
    logps = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * (target != -100)).sum(-1)


def unlearn(tb, evaluator, method: str, seed: int, steps: int, every: int, lr: float, beta: float = 0.1) -> list:
    """NPO (−(2/β)·log σ(−β·log πθ/π_ref), sequence level) or gradient ascent (−NLL) on the forget set.

    Both written out on the same batches, optimiser (AdamW, no decay, constant lr) and steps, so the only
    difference is the loss. NPO is also run through ``NPOTrainer`` in :func:`npo_trainer_check`.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(tb.model).train()
    reference = evaluator.start
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = [{"step": 0, **evaluator.forget(model)}]
    for step, (ids, attn, labels) in enumerate(_forget_batches(tb, tb.forget_dataset(), 8, steps, seed), 1):
        logps = _sequence_logps(model, ids, attn, labels)
        if method == "npo":
            with torch.no_grad():
                ref = _sequence_logps(reference, ids, attn, labels)
            loss = (-(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * (logps - ref))).mean()
        else:  # gradient ascent: maximise the NLL of the forget completions
            n_tokens = (labels[:, 1:] != -100).sum(-1)
            loss = (logps / n_tokens).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            curve.append({"step": step, "loss": loss.item(), **evaluator.forget(model)})
    return curve


def npo_trainer_check(tb, evaluator, seed: int, steps: int, lr: float, out: str) -> dict:
    """The same NPO run through hf_align.trainers.NPOTrainer (sequence level, no retain term)."""
    from hf_align.trainers import NPOConfig, NPOTrainer

    config = NPOConfig(
        output_dir=out, per_device_train_batch_size=8, max_steps=steps, learning_rate=lr, weight_decay=0.0,
        lr_scheduler_type="constant", beta=0.1, npo_level="sequence", report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, logging_steps=1000, seed=seed,
        precompute_ref_log_probs=True,
    )  # fmt: skip
    trainer = NPOTrainer(
        copy.deepcopy(tb.model), args=config, train_dataset=tb.forget_dataset(), processing_class=tb.tokenizer
    )
    trainer.train()
    return {"step": steps, **evaluator.forget(trainer.model.eval())}


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


def best_of_n(tb, model, n: int, num_prompts: int, seed: int):
    """RAFT-style data from the aligned model, AMA's adaptive objective: the best of n samples per prompt."""
    from datasets import Dataset

    from hf_align.testbed.evaluation import eval_prompts, generate_completions

    prompts = eval_prompts(num_prompts, seed=10_000 + seed)  # not the evaluation prompts
    samples = [generate_completions(model, tb.tokenizer, prompts, seed=seed * 100 + k) for k in range(n)]
    rewards = [testbed.reward(prompts, s) for s in samples]
    best = [max(range(n), key=lambda k, i=i: rewards[k][i]) for i in range(len(prompts))]
    return Dataset.from_dict({"prompt": prompts, "completion": [samples[best[i]][i] for i in range(len(prompts))]})


def ama_variants(tb, evaluator, dpo_model, seed: int, cfg: dict, tmp: str) -> list:
    """Partwise plans and adaptive α's (learned on best-of-4 samples of the DPO model), merged like the linear sweep."""
    from transformers import AutoModelForCausalLM

    from hf_align.merging import merge_models, partwise_plan
    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer

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
    for init in (0.2, 0.4):
        args = AdaptiveMergeConfig(
            output_dir=f"{tmp}/adaptive_{init}", init_val=init, mask_level="block3", learning_rate=cfg["ama_lr"],
            max_steps=cfg["ama_steps"], per_device_train_batch_size=16, lr_scheduler_type="constant",
            report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1000, seed=seed,
        )  # fmt: skip
        trainer = AdaptiveMergeTrainer(
            AutoModelForCausalLM.from_pretrained(aligned), base_model=tb.path, args=args, train_dataset=data,
            processing_class=tb.tokenizer,
        )  # fmt: skip
        trainer.train()
        out = Path(tmp) / f"adaptive_{init}_merged"
        trainer.merge(out, base=tb.path, aligned=aligned, progress=False)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        learned = [round(a, 3) for a in trainer.learned_alphas().block_alphas]
        points.append(
            {"name": f"adaptive init {init}", "mean_alpha": init, "block_alphas": learned, **evaluator(merged)}
        )
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

    config = FeedbackConditionedConfig(
        output_dir=out, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed,
        num_iterations=cfg["fb_iterations"], steps_per_iteration=cfg["fb_steps"],
        prompts_per_iteration=cfg["fb_prompts"], num_generations=4, max_new_tokens=6, per_device_train_batch_size=32,
        learning_rate=1e-3, lr_scheduler_type="constant", kl_coef=0.0, num_quantiles=5,
        feedback_template="{feedback}{prompt}", logging_steps=1000,
    )  # fmt: skip
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
            if state.global_step % config.steps_per_iteration == 0:
                self.record(state.global_step)

    trainer = FeedbackConditionedTrainer(
        copy.deepcopy(tb.model), config, tb.prompt_dataset(2048), processing_class=testbed.load_tokenizer(),
        reward_funcs=testbed.reward, callbacks=[PerIteration()],
    )  # fmt: skip
    trainer.train()
    return points


# ----------------------------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def summarize(runs: list[dict]) -> dict:
    methods = runs[0]["ablation"].keys()
    summary = {"ablation": {}, "npo": {}, "ama": {}}
    for m in methods:
        summary["ablation"][m] = {
            k: _mean_std([r["ablation"][m][k] for r in runs]) for k in ("mean_reward", "win_rate", "kl", "perplexity")
        }
    for method in ("npo", "gradient_ascent"):
        steps = [p["step"] for p in runs[0]["unlearning"][method]]
        summary["npo"][method] = [
            {
                "step": s,
                **{
                    k: _mean_std([r["unlearning"][method][i][k] for r in runs])
                    for k in ("forget_rate", "perplexity", "mean_reward")
                },
            }
            for i, s in enumerate(steps)
        ]
    if "ama_variants" in runs[0]:
        summary["ama_variants"] = {
            p["name"]: {
                k: _mean_std([r["ama_variants"][i][k] for r in runs]) for k in ("mean_reward", "perplexity", "kl")
            }
            for i, p in enumerate(runs[0]["ama_variants"])
        }
    if "feedback" in runs[0]:
        summary["feedback"] = [
            {
                "step": p["step"],
                **{
                    k: _mean_std([r["feedback"][i][k] for r in runs])
                    for k in ("reward_best", "reward_worst", "reward_bare")
                },
            }
            for i, p in enumerate(runs[0]["feedback"])
        ]
    for i, point in enumerate(runs[0]["ama"]):
        summary["ama"][f"{point['alpha']:.1f}"] = {
            k: _mean_std([r["ama"][i][k] for r in runs]) for k in ("mean_reward", "perplexity", "kl")
        }
    return summary


def plots(summary: dict, suffix: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        with atomic_file(RESULTS / name) as handle:
            fig.savefig(handle, format="png")
        written.append(name)

    # mask ablation bars
    fig = Figure(figsize=(9, 3.5), dpi=100)
    names = list(summary["ablation"])
    for k, (key, label) in enumerate((("mean_reward", "mean sampled reward"), ("perplexity", "retain perplexity"))):
        ax = fig.add_subplot(1, 2, k + 1)
        means = [summary["ablation"][n][key][0] for n in names]
        stds = [summary["ablation"][n][key][1] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color="tab:blue", capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
    save(fig, f"fidelity{suffix}_mask_ablation.png")

    # NPO vs gradient ascent curves
    fig = Figure(figsize=(9, 3.5), dpi=100)
    for k, (key, label) in enumerate((("forget_rate", "forget-behaviour rate"), ("perplexity", "retain perplexity"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for method in ("npo", "gradient_ascent"):
            curve = summary["npo"][method]
            ax.errorbar(
                [p["step"] for p in curve],
                [p[key][0] for p in curve],
                yerr=[p[key][1] for p in curve],
                label=method,
                marker="o",
                capsize=2,
            )
        ax.set_xlabel("step")
        ax.set_title(label)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.legend()
    save(fig, f"fidelity{suffix}_npo.png")

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
                [p["step"] for p in curve],
                [p[key][0] for p in curve],
                yerr=[p[key][1] for p in curve],
                label=label,
                marker="o",
                capsize=2,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("mean sampled reward")
        ax.legend()
        save(fig, f"fidelity{suffix}_feedback.png")

    # AMA Pareto
    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = [v["perplexity"][0] for v in summary["ama"].values()]
    ys = [v["mean_reward"][0] for v in summary["ama"].values()]
    ax.plot(xs, ys, marker="o")
    for alpha, x, y in zip(summary["ama"], xs, ys):
        ax.annotate(f"α={alpha}", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    for (name, v), marker in zip(summary.get("ama_variants", {}).items(), ("s", "D", "^", "v", "P")):
        ax.errorbar(
            v["perplexity"][0], v["mean_reward"][0], xerr=v["perplexity"][1], yerr=v["mean_reward"][1],
            marker=marker, linestyle="none", capsize=2, label=name,
        )  # fmt: skip
    if "ama_variants" in summary:
        ax.legend(fontsize=7)
    ax.set_xlabel("retain perplexity (lower is better)")
    ax.set_ylabel("mean sampled reward")
    ax.set_title("AMA: α·start + (1−α)·DPO (line: linear α)")
    save(fig, f"fidelity{suffix}_ama_pareto.png")
    return written


def markdown(report: dict, suffix: str) -> str:
    runs, summary, cfg = report["runs"], report["summary"], report["settings"]
    n = len(runs)
    pm = "mean ± std over" if n > 1 else "a single run,"
    lines = [
        f"# Method fidelity on the testbed{' (quick)' if report['quick'] else ''}",
        "",
        f"Generated by `python benchmarks/fidelity.py{' --quick' if report['quick'] else ''}` in "
        f"{report['wall_s'] / 60:.1f} min on CPU, {report['torch_threads']} torch thread(s) ({pm} {n} seed{'s' if n > 1 else ''}: "
        f"{report['seeds_completed']}"
        + (f" of the planned {cfg['seeds']}: the run was stopped early" if len(runs) < len(cfg["seeds"]) else "")
        + "). "
        f"Reward: mean testbed reward of one temperature-1 sample on {cfg['eval_prompts']} fixed prompts; "
        f"win rate and KL against the start model's samples on the same prompts (`hf_align.evaluation`); "
        f"retain perplexity on {cfg['retain_rows']} rows of `tb.retain_dataset` (completion + EOS given the prompt).",
        "",
        "## DPO vs MaskedDPO (ALLO's mask ablation)",
        "",
        f"{cfg['dpo_steps']} steps, batch 16, β = 0.1, {cfg['num_pairs']} pairs per seed; masks: 10 % of decoder rows "
        f"(top / bottom by the accumulated |gradient| of a {cfg['warmup_steps']}-step warm-up DPO, or random). "
        "Full DPO lr 5e-4, masked lr 2e-3. `allo_pipeline` runs ALLO's stages (recipes/allo/pipeline.yaml): "
        f"forgetting mask = top 5 %, improving mask = top 10 % of the same warm-up scores; rewrite-diff key tokens of "
        f"the rejected answers; token-level NPO on them for {cfg['allo_forget_steps']} steps (lr "
        f"{cfg['allo_forget_lr']:g}, forgetting mask only), then MaskedDPO from that model ({cfg['dpo_steps']} steps, "
        "improving mask only). The forgetting lr was picked from {5e-4, 2e-4, 1e-4} on seed 0 (5e-4 blew up the "
        "retain perplexity).",
        "",
        "| method | mean reward | win rate vs start | KL(policy‖start) | retain perplexity |",
        "|---|---|---|---|---|",
    ]
    for m in summary["ablation"]:
        cells = [
            _fmt([r["ablation"][m][k] for r in runs], 2 if k in ("kl", "perplexity") else 3)
            for k in ("mean_reward", "win_rate", "kl", "perplexity")
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## NPO vs gradient ascent (forget set: answers followed by ` ugh`)",
        "",
        f"Sequence-level losses on `tb.forget_dataset`, batch 8, AdamW lr {report['settings']['unlearn_lr']}, "
        "constant schedule, no retain term (both), same batches.",
        "",
        "| step | NPO forget rate | NPO retain ppl | GA forget rate | GA retain ppl | NPO reward | GA reward |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, point in enumerate(runs[0]["unlearning"]["npo"]):
        vals = []
        for method, key in (
            ("npo", "forget_rate"),
            ("npo", "perplexity"),
            ("gradient_ascent", "forget_rate"),
            ("gradient_ascent", "perplexity"),
            ("npo", "mean_reward"),
            ("gradient_ascent", "mean_reward"),
        ):
            digits = 2 if key == "perplexity" else 3
            vals.append(_fmt([r["unlearning"][method][i][key] for r in runs], digits))
        lines.append(f"| {point['step']} | " + " | ".join(vals) + " |")
    if runs[0].get("npo_trainer"):
        lines += [
            "",
            "Cross-check, the same NPO run through `hf_align.trainers.NPOTrainer` (precomputed reference, "
            f"{cfg['npo_steps']} steps): forget rate "
            + _fmt([r["npo_trainer"]["forget_rate"] for r in runs])
            + ", retain perplexity "
            + _fmt([r["npo_trainer"]["perplexity"] for r in runs], 2)
            + ".",
        ]
    lines += [
        "",
        "## AMA: linear averaging between the start model (α = 1) and the full-DPO model (α = 0)",
        "",
        "| α | mean reward | retain perplexity | KL(policy‖start) |",
        "|---|---|---|---|",
    ]
    for i, point in enumerate(runs[0]["ama"]):
        vals = [
            _fmt([r["ama"][i][k] for r in runs], 2 if k != "mean_reward" else 3)
            for k in ("mean_reward", "perplexity", "kl")
        ]
        lines.append(f"| {point['alpha']:.1f} | " + " | ".join(vals) + " |")
    if "ama_variants" in summary:
        lines += [
            "",
            "Partwise (one α per part of the 6 layers: 0–1 | 2–3 | 4–5; embeddings take the first part's α, the head "
            f"the last's) and adaptive AMA (per-block α's learned for {cfg['ama_steps']} steps, lr {cfg['ama_lr']:g}, "
            "block3, ε = 0.2, on best-of-4 samples of the DPO model for "
            f"{cfg['ama_prompts']} prompts, the mean α fixed at its init):",
            "",
            "| variant | mean α | mean reward | retain perplexity | KL(policy‖start) | learned block α's (seed 0) |",
            "|---|---|---|---|---|---|",
        ]
        for i, point in enumerate(runs[0]["ama_variants"]):
            vals = [
                _fmt([r["ama_variants"][i][k] for r in runs], 2 if k != "mean_reward" else 3)
                for k in ("mean_reward", "perplexity", "kl")
            ]
            learned = point.get("block_alphas", "–")
            name = point["name"].replace("|", "\\|")  # a Markdown table cell
            lines.append(f"| {name} | {point['mean_alpha']:g} | " + " | ".join(vals) + f" | {learned} |")
    if report.get("adapters"):
        lines += ["", *adapters_module().markdown(report["adapters"])]
    if "feedback" in summary:
        lines += [
            "",
            "## Feedback-conditioned training (Quark-style quantiles, 5 bins)",
            "",
            f"{cfg['fb_iterations']} iterations × {cfg['fb_steps']} steps, {cfg['fb_prompts']} prompts × 4 samples per "
            "iteration, batch 32, lr 1e-3 constant, no KL. Reward of samples conditioned on the best bin (0), on the "
            "worst bin that holds pool rows (tied zero rewards leave bin 4 empty), and on the bare prompt; step 0 "
            'is the start model. "pool" is the mean reward of the samples the loop itself drew in that iteration '
            "(conditioned on the best bin from the second iteration on).",
            "",
            "| step | reward given best bin | given worst populated bin | bare prompt | pool samples |",
            "|---|---|---|---|---|",
        ]
        for i, p in enumerate(summary["feedback"]):
            cells = [_fmt([r["feedback"][i][k] for r in runs]) for k in ("reward_best", "reward_worst", "reward_bare")]
            pool = [r["feedback"][i]["pool_mean_score"] for r in runs if "pool_mean_score" in r["feedback"][i]]
            cells.append(_fmt(pool) if pool else "–")
            lines.append(f"| {p['step']} | " + " | ".join(cells) + " |")
    lines += ["", "## Findings", "", *report.get("findings", []), ""]
    lines += [
        "## Not shown here / caveats",
        "",
        "- Learning rates are untuned beyond what the text says; the budgets are minutes on CPU, far below the papers'.",
        "- NPO and gradient ascent run without a retain term (the NPO paper usually adds one), to compare the losses "
        "alone.",
        "- Feedback conditioning puts a new token in front of every prompt, a context the tiny testbed model never saw: "
        "alone it lowers the reward (~0.37 → ~0.24 untrained), so the loop first wins that back. Shorter runs "
        "(≤ 100 steps per iteration, pools of a few hundred samples) end *below* the start model.",
        "",
    ]
    lines += ["Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"]), ""]
    return "\n".join(lines)


def findings(summary: dict, num_seeds: int) -> list[str]:
    """Plain-language statements computed from the summary (so the Markdown never claims what the numbers don't)."""
    out = []
    ab = summary["ablation"]

    def r(name, key="mean_reward"):
        return ab[name][key][0]

    def sd(name, key="mean_reward"):
        return ab[name][key][1]

    out.append(
        f"- Full DPO lifts the reward {r('start'):.3f} → {r('dpo'):.3f}; MaskedDPO top-10 % reaches {r('masked_top10'):.3f}, "
        f"random-10 % {r('masked_random10'):.3f}, bottom-10 % {r('masked_bottom10'):.3f}."
    )
    order = r("masked_top10") > r("masked_random10") > r("masked_bottom10")
    spread = f"mean ± std over {num_seeds} seeds" if num_seeds > 1 else "a single seed, no spread to compare against"
    out.append(
        "- The ALLO ablation order top > random > bottom "
        + ("holds" if order else "does **not** hold")
        + " on the mean; "
        + (
            "top beats full DPO"
            if r("masked_top10") - sd("masked_top10") > r("dpo") + sd("dpo")
            else "top is not separated from full DPO by more than one std"
            if r("masked_top10") >= r("dpo")
            else "top does **not** beat full DPO"
        )
        + f" (the paper's claim is top-mask ≥ full DPO; {spread})."
    )
    if "allo_pipeline" in ab:
        allo, top = ab["allo_pipeline"]["mean_reward"], ab["masked_top10"]["mean_reward"]
        verdict = (
            "above"
            if allo[0] - allo[1] > top[0] + top[1]
            else "below"
            if allo[0] + allo[1] < top[0] - top[1]
            else "within one std of"
        )
        out.append(
            f"- The full ALLO pipeline (forget with NPO on key tokens, then improve) reaches {allo[0]:.3f} ± {allo[1]:.3f}: "
            f"{verdict} MaskedDPO with the top-10 % mask alone ({top[0]:.3f} ± {top[1]:.3f}), full DPO {r('dpo'):.3f}; "
            f"retain perplexity {r('allo_pipeline', 'perplexity'):.2f}."
        )
    out.append(
        f"- Retain perplexity (alignment tax): start {r('start', 'perplexity'):.2f}, DPO {r('dpo', 'perplexity'):.2f}, "
        f"top-10 % {r('masked_top10', 'perplexity'):.2f}, random {r('masked_random10', 'perplexity'):.2f}, "
        f"bottom {r('masked_bottom10', 'perplexity'):.2f}."
    )
    npo, ga = summary["npo"]["npo"], summary["npo"]["gradient_ascent"]

    def first_below(curve, threshold):
        return next((p for p in curve if p["forget_rate"][0] <= threshold), None)

    half = npo[0]["forget_rate"][0] / 2
    pn, pg = first_below(npo, half), first_below(ga, half)
    out.append(
        f"- Unlearning: forget rate {npo[0]['forget_rate'][0]:.3f} at the start; after {npo[-1]['step']} steps NPO "
        f"{npo[-1]['forget_rate'][0]:.3f} (retain ppl {npo[-1]['perplexity'][0]:.2f}), gradient ascent "
        f"{ga[-1]['forget_rate'][0]:.3f} (retain ppl {ga[-1]['perplexity'][0]:.2f})."
    )
    if pn and pg:
        out.append(
            f"- At the first evaluation where the forget rate is halved, NPO (step {pn['step']}) has retain perplexity "
            f"{pn['perplexity'][0]:.2f} and gradient ascent (step {pg['step']}) {pg['perplexity'][0]:.2f}: "
            + (
                "NPO forgets at a lower alignment tax, as the paper claims."
                if pn["perplexity"][0] < pg["perplexity"][0]
                else "NPO does **not** show a lower tax than gradient ascent here."
            )
        )
    else:
        missing = [name for name, p in (("NPO", pn), ("gradient ascent", pg)) if p is None]
        out.append(f"- {' and '.join(missing)} never halve(s) the forget rate within the budget; see the table.")
    if npo[-1]["perplexity"][0] < ga[-1]["perplexity"][0]:
        out.append(
            f"- At the last step NPO's retain perplexity ({npo[-1]['perplexity'][0]:.2f}) is below gradient ascent's "
            f"({ga[-1]['perplexity'][0]:.2f}): NPO slows the collapse, the paper's claim. Neither uses a retain term "
            "here, so both eventually damage the retained skill."
        )
    else:
        out.append("- NPO does **not** keep a lower retain perplexity than gradient ascent at the last step.")
    if "feedback" in summary:
        fb = summary["feedback"]
        start, best, worst = fb[0]["reward_bare"], fb[-1]["reward_best"], fb[-1]["reward_worst"]
        gap = best[0] - worst[0]
        beats_start = best[0] - best[1] > start[0] + start[1]
        out.append(
            f"- Feedback conditioning (Quark): after {fb[-1]['step']} steps, samples conditioned on the best bin score "
            f"{best[0]:.3f} ± {best[1]:.3f}, the start model {start[0]:.3f} ± {start[1]:.3f}, the worst populated bin "
            f"{worst[0]:.3f} ± {worst[1]:.3f}. "
            + (
                "The best bin beats the start model"
                if beats_start
                else "The best bin does **not** clearly beat the start"
            )
            + (" and is separated from the worst bin" if gap > 0.05 else "; the bins are **not** separated")
            + " — the Quark claim"
            + (" holds on this testbed." if beats_start and gap > 0.05 else " is not shown on this budget.")
        )
    ama = summary["ama"]
    keys = sorted(ama, key=float)
    rewards = [ama[k]["mean_reward"][0] for k in keys]
    ppls = [ama[k]["perplexity"][0] for k in keys]
    dominated = [
        k for i, k in enumerate(keys)
        if any(rewards[j] >= rewards[i] and ppls[j] <= ppls[i] and (rewards[j], ppls[j]) != (rewards[i], ppls[i]) for j in range(len(keys)))
    ]  # fmt: skip
    out.append(
        f"- AMA: reward goes {rewards[-1]:.3f} (α=1, start) → {rewards[0]:.3f} (α=0, DPO), retain perplexity "
        f"{ppls[-1]:.2f} → {ppls[0]:.2f}. "
        + (
            "Intermediate α's trade reward for perplexity along a front"
            if not dominated
            else f"Dominated points (no better on either axis than another α): α ∈ {dominated}; the front is "
            f"α ∈ {[k for k in keys if k not in dominated]}"
        )
        + "."
    )
    if "ama_variants" in summary:
        # The linear front at a perplexity: the best reward of a linear α whose perplexity is no higher (the curve
        # is not monotone in perplexity, so no interpolation). A variant beats it when the gap exceeds both stds.
        verdicts, above = [], []
        for name, v in summary["ama_variants"].items():
            (rew, rew_sd), (ppl, _) = v["mean_reward"], v["perplexity"]
            # none reachable: the variant's perplexity is below every linear α's; compare with the lowest one
            reachable = [k for k in keys if ama[k]["perplexity"][0] <= ppl] or [
                min(keys, key=lambda k: ama[k]["perplexity"][0])
            ]
            best = max(reachable, key=lambda k: ama[k]["mean_reward"][0])
            lin, lin_sd = ama[best]["mean_reward"]
            verdicts.append(
                f"{name} {rew:.3f} ± {rew_sd:.3f} at ppl {ppl:.2f} vs linear α={best} {lin:.3f} ± {lin_sd:.3f} "
                f"(ppl {ama[best]['perplexity'][0]:.2f})"
            )
            if rew - rew_sd > lin + lin_sd:
                above.append(name)
        out.append(
            "- AMA variants vs the best linear α at no higher retain perplexity: "
            + "; ".join(verdicts)
            + (
                f". Above the linear front by more than one std: {above}."
                if above
                else ". None beats the linear front by more than one std on this testbed."
            )
        )
    return out


def run_seed(tb, evaluator, seed: int, cfg: dict, tmp: str) -> dict:
    from hf_align.masks import NeuronMask

    t0 = time.time()
    data = tb.preference_dataset(cfg["num_pairs"], seed=100 + seed)
    result = {"seed": seed, "ablation": {}, "timings_s": {}}

    def timed(name, fn):
        start = time.time()
        value = fn()
        result["timings_s"][name] = round(time.time() - start, 1)
        return value

    result["ablation"]["start"] = timed("eval_start", lambda: evaluator(tb.model))
    dpo = timed("dpo", lambda: train_dpo(tb, data, seed, cfg["dpo_steps"], f"{tmp}/dpo"))
    result["ablation"]["dpo"] = evaluator(dpo)
    scores = timed("warmup", lambda: warmup_scores(tb, data, seed, cfg["warmup_steps"], f"{tmp}/warmup"))
    masks = {
        "masked_top10": NeuronMask.from_scores(scores, 0.1, select="top"),
        "masked_random10": NeuronMask.random(tb.model, 0.1, "row", seed=seed),
        "masked_bottom10": NeuronMask.from_scores(scores, 0.1, select="bottom"),
    }
    for name, mask in masks.items():
        model = timed(
            name, lambda mask=mask, name=name: train_masked(tb, data, seed, cfg["dpo_steps"], f"{tmp}/{name}", mask)
        )
        result["ablation"][name] = evaluator(model)
        print(f"  seed {seed} {name}: {result['ablation'][name]}", flush=True)
    allo = timed("allo_pipeline", lambda: allo_pipeline(tb, data, seed, cfg, scores, f"{tmp}/allo"))
    result["ablation"]["allo_pipeline"] = evaluator(allo)
    print(f"  seed {seed} allo_pipeline: {result['ablation']['allo_pipeline']}", flush=True)
    print(f"  seed {seed} dpo: {result['ablation']['dpo']}", flush=True)
    lr = cfg["unlearn_lr"]
    result["unlearning"] = {
        m: timed(m, lambda m=m: unlearn(tb, evaluator, m, seed, cfg["npo_steps"], cfg["npo_eval_every"], lr))
        for m in ("npo", "gradient_ascent")
    }
    result["npo_trainer"] = timed(
        "npo_trainer", lambda: npo_trainer_check(tb, evaluator, seed, cfg["npo_steps"], lr, f"{tmp}/npo")
    )
    result["ama"] = timed("ama", lambda: ama_sweep(tb, evaluator, dpo, cfg["alphas"], tmp))
    result["ama_variants"] = timed("ama_variants", lambda: ama_variants(tb, evaluator, dpo, seed, cfg, tmp))
    if "feedback" in cfg["sections"]:
        result["feedback"] = timed("feedback", lambda: feedback_quantile(tb, evaluator, seed, cfg, f"{tmp}/feedback"))
    result["timings_s"]["total"] = round(time.time() - t0, 1)
    print(f"seed {seed} done in {result['timings_s']['total']:.0f}s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps and prompts (< 2 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds")
    parser.add_argument(
        "--sections", nargs="*", default=["adapters", "feedback"], choices=["adapters", "feedback"],
        help="optional sections on top of the mask ablation, NPO and AMA",
    )  # fmt: skip
    parser.add_argument(
        "--rewrite", action="store_true", help="only rebuild summary, Markdown and plots from the existing JSON"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the note in main)")
    parser.add_argument("--unlearn_lr", type=float, default=5e-4, help="lr of NPO and gradient ascent")
    args = parser.parse_args(argv)
    cfg = settings(args.quick)
    if args.rewrite:
        from hf_align.io import read_json

        suffix = "_quick" if args.quick else ""
        old = read_json(RESULTS / f"fidelity{suffix}.json")
        for run in old["runs"]:
            run.pop("adapters", None)  # the per-seed adapters section this file no longer has
        section = RESULTS / f"fidelity_adapters{suffix}.json"  # the adapters section's own, newest result
        adapters = read_json(section) if section.exists() else old.get("adapters")
        if adapters:
            adapters = adapters_module().refresh(adapters)  # summary and text from the runs
        report = write_report(
            old["runs"], old["settings"], args.quick, time.time() - old["wall_s"], old["torch_threads"], adapters
        )
        print(report["markdown"])
        return 0
    if args.seeds:
        cfg["seeds"] = args.seeds
    cfg["unlearn_lr"] = args.unlearn_lr
    cfg["sections"] = args.sections
    # One thread by default: on a shared 2-core machine two-thread OpenMP runs slowed down up to 100x
    # (spin-waiting) while other jobs ran; one thread degrades gracefully.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    tb = testbed.load()
    evaluator = Evaluator(tb, cfg["eval_prompts"], cfg["retain_rows"])
    runs = []
    for seed in cfg["seeds"]:
        with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
            runs.append(run_seed(tb, evaluator, seed, cfg, tmp))
        report = write_report(runs, cfg, args.quick, start)  # after every seed: a killed run keeps what it has
    if "adapters" in cfg["sections"]:
        adapters = adapters_module().run_section(args.quick, RESULTS, seeds=args.seeds)
        report = write_report(runs, cfg, args.quick, start, adapters=adapters)
    print(report["markdown"])
    print(
        f"wrote {RESULTS}/fidelity{'_quick' if args.quick else ''}.json and .md in {(time.time() - start) / 60:.1f} min"
    )
    return 0 if all(math.isfinite(v["mean_reward"][0]) for v in report["summary"]["ablation"].values()) else 1


def write_report(
    runs: list[dict], cfg: dict, quick: bool, start: float, threads: int | None = None, adapters: dict | None = None
) -> dict:
    summary = summarize(runs)
    suffix = "_quick" if quick else ""
    args = argparse.Namespace(quick=quick)
    report = {
        "quick": args.quick,
        "settings": {**cfg, "alphas": list(cfg["alphas"])},
        "torch_threads": threads or torch.get_num_threads(),
        "runs": runs,
        "summary": summary,
        "findings": findings(summary, len(runs)),
        "plots": [],
        "wall_s": time.time() - start,
    }
    report["plots"] = plots(summary, suffix)
    if adapters:
        report["adapters"] = adapters
        adapters_module().plot(adapters, RESULTS / adapters["plot"])
        report["plots"].append(adapters["plot"])
    report["seeds_completed"] = [r["seed"] for r in runs]
    write_json(RESULTS / f"fidelity{suffix}.json", report)
    text = markdown(report, suffix)
    with atomic_file(RESULTS / f"fidelity{suffix}.md", "w") as handle:
        handle.write(text)
    return {**report, "markdown": text}


if __name__ == "__main__":
    raise SystemExit(main())
