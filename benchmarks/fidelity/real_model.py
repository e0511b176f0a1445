"""The testbed's claims judged again on a real pretrained chat model: SmolLM2-135M-Instruct, offline (a section of
the fidelity report, run on its own because it takes the better part of an hour).

    make real-model && python -m benchmarks.fidelity.real_model          # ≈ 45-60 min on 2 idle CPU cores
    python -m benchmarks.fidelity.real_model --quick                       # smoke: one seed, a few steps (minutes)
    python -m benchmarks.fidelity.real_model --rewrite                     # summary and plot from the JSON

The tasks are the examples' (``examples/real_task.py``: verifiable instruction following, a word limit or "the
number only", scored by a programmatic checker; capital-city facts for knowledge), so every number here can be
reproduced one method at a time with ``examples/*.py``. Prompts come in three disjoint splits: training prompts
(the examples' topics, numbers 2-49), **selection** prompts (half the held-out topics, numbers 50-74) on which each
method's learning rate is chosen, and **test** prompts (the other held-out topics, numbers 75-99) that the tables
show. Facts are split per seed the same way. Every method gets the same three-point lr sweep (its base lr × ⅓, 1,
3) on the first seed, chosen on the selection split; the other seeds rerun the chosen lr. The mask controls and the
full ALLO pipeline are masked DPO too: they take the top-10 % mask's chosen lr (``FOLLOWS``). Parts:

* **allo**: full DPO (``trl.DPOTrainer``), LoRA r=8, and ``MaskedDPOTrainer`` with the top / random / bottom 10 %
  of rows by a warm-up DPO's accumulated |gradient| (ALLO's headline and mask order); ALLO's stages on top of the
  top-10 % mask, together (the testbed could not separate them one by one): key-token NPO forgetting (top 5 % mask;
  the key tokens of a rejected reply are labelled by the checker: the words past the limit, the wrong number),
  then the improving stage with its token selection ε = 0.5. Measures: test
  reward (greedy) and knowledge (share of known capitals still answered right). **AMA** runs here too, on a full DPO
  at 3× its chosen lr (an aligned model that costs knowledge): linear α ∈ {¼, ½, ¾}, partwise and adaptive merges.
* **unlearning**: NPO vs gradient ascent on the capital token of six known facts, each with a retain NLL term.
  hf-align's token-level NPO (ALLO's) is ``-log σ(-βΔ)`` per token: its gradient is ``β σ(βΔ) ∇Δ``, ``β/2 ∇Δ`` at
  the start. GA is its β → 0 limit (β = 0.001, where ``σ(βΔ)`` stays ≈ ½ while Δ > -100) with the retain weight
  scaled by the same 0.001 / 0.1, so both start with the same update (Adam ignores the common scale) and differ
  only by NPO's weight ``σ(βΔ)`` shrinking as a token is forgotten. Forget rate and retained accuracy on test facts
  every few steps, compared at equal forget rate
  (the first evaluation reaching ``forget_target``).
* **adapters**: Aligner N=1 / N=10, LoRA r=8 and PEFT's LLaMA-Adapter learning a global style (" Cheers!" after
  the model's own first line): style rate and fact accuracy on test prompts.
* **quark**: ``FeedbackConditionedTrainer`` with the checker's reward in five quantiles: before, best bin, worst
  populated bin and no feedback token.

Writes ``benchmarks/results/fidelity_real_model.json`` (runs, chosen lrs, summary, verdicts, machine, threads and
load) and ``fidelity_real_model.png``; ``python -m benchmarks.fidelity --rewrite`` puts the section into
``fidelity.md``. Each part × seed is a process of one thread, two at a time (``--jobs``); a part's later seeds
start when its first seed has chosen the lrs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from benchmarks.fidelity.common import RESULTS, below, best_lr, fmt, mean_std, verdict


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PARTS = ("allo", "unlearning", "adapters", "quark")
NAME = "real_model"
SWEEP = (1 / 3, 1.0, 3.0)


def examples():
    """The examples' task module and helpers (``examples/`` is a folder of scripts, not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import real_task

    return real_task


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            seeds=[0], train_prompts=8, selection_prompts=4, test_prompts=4, dpo_steps=1, warmup_steps=1,
            forget_steps=1, ama_adaptive_steps=1, sweep=[1.0], npo_steps=2, npo_eval_every=1, forget_facts=2,
            style_rows=4, sft_steps=1, quark_rounds=1, quark_steps=1, quark_prompts=4, max_new_tokens=12,
        )  # fmt: skip
    return dict(
        seeds=[0, 1, 2], train_prompts=64, selection_prompts=24, test_prompts=48, dpo_steps=8, warmup_steps=4,
        forget_steps=4, ama_adaptive_steps=4, sweep=list(SWEEP), npo_steps=20, npo_eval_every=4, forget_facts=6,
        style_rows=24, sft_steps=12, quark_rounds=2, quark_steps=5, quark_prompts=24, max_new_tokens=32,
    )  # fmt: skip


BASE_LR = {  # each method's base lr (the examples' defaults); the sweep multiplies it by SWEEP
    "dpo": 5e-6, "lora": 1e-4, "mask_top10": 5e-5, "mask_random10": 5e-5, "mask_bottom10": 5e-5,
    "allo_full": 5e-5, "npo": 1e-5, "ga": 1e-5, "aligner_n1": 9e-3, "aligner_n10": 3e-3,
    "lora_r8": 1e-3, "llama_adapter": 9e-3, "quark": 1e-5,
}  # fmt: skip
NPO_BETA = {"npo": 0.1, "ga": 0.001}  # GA: token-level NPO's β → 0 limit, retain weight scaled alike (docstring)
FORGET_LR = 5e-5  # ALLO's forgetting stage (masked, token-level NPO): fixed, not swept
EPSILON = 0.5


# ------------------------------------------------------------------------------------------------ data splits
def prompt_split(task, split: str, count: int, seed: int) -> list[dict]:
    """Training, selection or test rows: disjoint topics and number ranges (see the module docstring)."""
    half = len(task.HELD_OUT_TOPICS) // 2
    if split == "train":
        return task.make_prompts(count, seed)
    topics, numbers = (
        (task.HELD_OUT_TOPICS[:half], (50, 74)) if split == "selection" else (task.HELD_OUT_TOPICS[half:], (75, 99))
    )
    return task.make_prompts(count, seed, held_out=True, topics=topics, numbers=numbers)


def fact_split(facts: list[dict]) -> tuple[list[dict], list[dict]]:
    """Known facts cut in two: selection (lr choice) and test."""
    return facts[: len(facts) // 2], facts[len(facts) // 2 :]


FOLLOWS = {"mask_random10": "mask_top10", "mask_bottom10": "mask_top10", "allo_full": "mask_top10"}
"""Variants of one method that take its chosen lr instead of a sweep of their own: the mask controls and the full
pipeline are masked DPO too (the budget buys three seeds rather than three more sweeps)."""


def lrs(method: str, cfg: dict, chosen: dict | None, variants: dict | None = None) -> list[float]:
    """The lrs a method trains with: the chosen one on a later seed, else its sweep (or its leader's choice)."""
    if chosen:
        return [chosen[method]]
    if method in FOLLOWS and variants is not None:
        return [variants[FOLLOWS[method]]["lr"]]
    return [BASE_LR[method] * f for f in cfg["sweep"]]


def key_token_weights(tokenizer):
    """The checker's key tokens of a rejected reply (ALLO's forgetting labels, written by rule, not by a model):
    the words past a word limit, or the wrong number and whatever follows a reply that is not the number alone."""
    from hf_align.token_weights import weights_from_char_spans

    def label(prompt, response) -> list[float]:
        text = response[-1]["content"] if isinstance(response, list) else response
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        limit = re.search(r"at most (\d+) words", question)
        if limit:
            words = list(re.finditer(r"\S+", text))
            spans = [(w.start(), w.end()) for w in words[int(limit.group(1)) :]]
        else:
            a, b = (int(n) for n in re.findall(r"\d+", question)[:2])
            spans = [(m.start(), m.end()) for m in re.finditer(r"-?\d+", text) if int(m.group()) != a + b]
            number = re.match(r"\s*-?\d+\.?", text)
            if number and number.end() < len(text.rstrip()):  # the number, then more text
                spans.append((number.end(), len(text)))
        return weights_from_char_spans(tokenizer, prompt, response, spans or [(0, len(text))], special=0.0)

    return label


# ------------------------------------------------------------------------------------------------ the parts
class Run:
    """One part × seed: the model path, the task module, the splits and a timer."""

    def __init__(self, path: str, cfg: dict, seed: int, tmp: str):
        import torch

        self.task, self.path, self.cfg, self.seed, self.tmp = examples(), path, cfg, seed, tmp
        self.task.GENERATION["max_new_tokens"] = cfg["max_new_tokens"]
        torch.manual_seed(seed)
        self.model, self.tokenizer = self.task.load_model(path)
        self.train = prompt_split(self.task, "train", cfg["train_prompts"], seed)
        self.selection = prompt_split(self.task, "selection", cfg["selection_prompts"], seed)
        self.test = prompt_split(self.task, "test", cfg["test_prompts"], seed)
        self.timings: dict[str, float] = {}
        self.args = argparse.Namespace(seed=seed)

    def fresh(self):
        return self.task.load_model(self.path)[0]

    def timed(self, name: str, fn, *a, **kw):
        start = time.time()
        out = fn(*a, **kw)
        self.timings[name] = round(time.time() - start, 1)
        return out

    def reward(self, model, rows) -> float:
        return self.task.held_out_reward(model, self.tokenizer, rows)


def run_allo(run: Run, chosen: dict | None) -> dict:
    """Full DPO, LoRA, the three masks, ALLO's stages; then AMA on a stronger full DPO (see the docstring)."""
    from peft import LoraConfig

    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.key_tokens import label_dataset
    from hf_align.masks import NeuronMask
    from hf_align.scores import load_scores
    from hf_align.sparse_update import merge_deltas
    from hf_align.trainers import NPOConfig, NPOTrainer

    task, cfg, tok = run.task, run.cfg, run.tokenizer
    facts = task.known_facts(run.model, tok, run.seed)
    sel_facts, test_facts = fact_split(facts)
    pairs = run.timed("pairs", task.on_policy_pairs, run.model, tok, run.train, seed=run.seed)
    if len(pairs) == 0:
        raise RuntimeError(f"seed {run.seed}: every prompt's samples scored the same (no preference pair)")
    steps = cfg["dpo_steps"]

    def measure(model) -> dict:
        return {"reward": run.reward(model, run.test), "knowledge": task.fact_accuracy(model, tok, test_facts)}

    out = {"pairs": len(pairs), "known_facts": len(facts), "before": measure(run.model), "variants": {}, "sweep": {}}

    callback = MaskAccumulationCallback(method="gradient", granularity="row")
    run.timed("warmup", task.train_dpo, run.fresh(), tok, pairs, run.args, f"{run.tmp}/warmup", cfg["warmup_steps"],
              BASE_LR["dpo"], callbacks=[callback])  # fmt: skip
    scores, _ = load_scores(f"{run.tmp}/warmup")
    masks = {
        "mask_top10": NeuronMask.from_scores(scores, 0.1),
        "mask_random10": NeuronMask.from_scores(scores, 0.1, select="random"),
        "mask_bottom10": NeuronMask.from_scores(scores, 0.1, select="bottom"),
    }
    forget_mask = NeuronMask.from_scores(scores, 0.05)
    labelled = label_dataset(pairs, tok, key_token_weights(tok))
    forgot_path = f"{run.tmp}/forgot"

    def forgotten():
        """ALLO's forgetting stage once per seed: token-level NPO on the rejected replies' key tokens, top 5 %."""
        if not Path(forgot_path).exists():
            config = NPOConfig(
                output_dir=f"{run.tmp}/forget", max_steps=cfg["forget_steps"], learning_rate=FORGET_LR,
                per_device_train_batch_size=4, beta=0.1, npo_level="token", lr_scheduler_type="constant",
                max_length=160, seed=run.seed, **task.QUIET,
            )  # fmt: skip
            trainer = NPOTrainer(run.fresh(), args=config, train_dataset=labelled, processing_class=tok,
                                 neuron_mask=forget_mask)  # fmt: skip
            run.timed("forget", trainer.train)
            merge_deltas(trainer.model).save_pretrained(forgot_path)
            tok.save_pretrained(forgot_path)
        return task.load_model(forgot_path)[0]

    def train(name: str, lr: float):
        if name == "dpo":
            return task.train_dpo(run.fresh(), tok, pairs, run.args, f"{run.tmp}/{name}", steps, lr)
        if name == "lora":
            lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
            return task.train_dpo(run.fresh(), tok, pairs, run.args, f"{run.tmp}/{name}", steps, lr, peft_config=lora)
        start = forgotten() if name == "allo_full" else run.fresh()
        mask = masks.get(name, masks["mask_top10"])
        epsilon = EPSILON if name == "allo_full" else None
        return task.train_dpo(start, tok, pairs, run.args, f"{run.tmp}/{name}", steps, lr,
                              config_kwargs={"rejected_token_ratio": epsilon}, neuron_mask=mask)  # fmt: skip

    for name in ("dpo", "lora", *masks, "allo_full"):
        models, out["sweep"][name] = {}, {}
        for lr in lrs(name, cfg, chosen, out["variants"]):
            models[f"{lr:g}"] = run.timed(f"{name}_{lr:g}", train, name, lr)
            out["sweep"][name][f"{lr:g}"] = run.reward(models[f"{lr:g}"], run.selection)
        lr = best_lr(out["sweep"][name])
        out["variants"][name] = {"lr": float(lr), **measure(models[lr])}
        del models
    out["ama"] = run_ama(run, pairs, 3 * out["variants"]["dpo"]["lr"], measure)
    out["selection_facts"] = len(sel_facts)
    return out


def run_ama(run: Run, pairs, lr: float, measure) -> dict:
    """The aligned model (full DPO at ``lr``), linear / partwise / adaptive merges with the base, each measured."""
    from datasets import Dataset

    from hf_align.merging import merge_models, partwise_plan
    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer

    task, tok, tmp = run.task, run.tokenizer, run.tmp
    aligned = run.timed("ama_dpo", task.train_dpo, run.fresh(), tok, pairs, run.args, f"{tmp}/ama_dpo",
                        run.cfg["dpo_steps"], lr)  # fmt: skip
    aligned.save_pretrained(f"{tmp}/aligned")
    tok.save_pretrained(f"{tmp}/aligned")
    out = {"dpo_lr": lr, "aligned": measure(aligned), "linear": {}}
    del aligned

    def merged(name, **kw):
        merge_models(run.path, f"{tmp}/aligned", f"{tmp}/{name}", dtype="float32", progress=False, **kw)
        return measure(task.load_model(f"{tmp}/{name}")[0])

    for alpha in (0.25, 0.5, 0.75):
        out["linear"][f"{alpha:g}"] = merged(f"linear_{alpha:g}", alpha=alpha)
    out["partwise"] = merged(
        "partwise", plan=lambda names, config: partwise_plan(names, pivots="10#20", alphas="0.4|0.3|0.2")
    )
    config = AdaptiveMergeConfig(
        output_dir=f"{tmp}/ama", max_steps=run.cfg["ama_adaptive_steps"], per_device_train_batch_size=4,
        learning_rate=2e-2, max_length=160, seed=run.seed, **task.QUIET,
    )  # fmt: skip
    sft = Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs["chosen"]})
    trainer = AdaptiveMergeTrainer(f"{tmp}/aligned", base_model=run.path, args=config, train_dataset=sft)
    run.timed("ama_adaptive", trainer.train)
    out["adaptive_block_alphas"] = [round(a, 4) for a in trainer.learned_alphas().block_alphas]
    trainer.merge(f"{tmp}/adaptive", dtype="float32", progress=False)
    del trainer
    out["adaptive"] = measure(task.load_model(f"{tmp}/adaptive")[0])
    return out


class FactProbe(TrainerCallback):
    """Answers the fact questions every ``every`` steps (greedy) and keeps the curve."""

    def __init__(self, task, tokenizer, sets: dict[str, list[dict]], every: int):
        self.curve: list[dict] = []
        self.task, self.tokenizer, self.sets, self.every = task, tokenizer, sets, every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.curve.append({"step": state.global_step, **self.measure(model)})

    def measure(self, model) -> dict:
        acc = {name: self.task.fact_accuracy(model, self.tokenizer, rows) for name, rows in self.sets.items()}
        return {"forget_rate": 1.0 - acc.pop("forget"), **{f"{k}_accuracy": v for k, v in acc.items()}}


def at_forget_rate(curve: list[dict], target: float, key: str) -> float:
    """``key`` at the first evaluation whose forget rate reaches ``target`` (NaN when none does)."""
    return next((p[key] for p in curve if p["forget_rate"] >= target), math.nan)


def unlearning_loss(method: str) -> dict[str, float]:
    """β and retain weight of NPO or GA (GA's retain weight shrinks with its β: see the module docstring)."""
    return {"beta": NPO_BETA[method], "retain_weight": NPO_BETA[method] / NPO_BETA["npo"]}


def run_unlearning(run: Run, chosen: dict | None) -> dict:
    import npo_unlearning

    from hf_align.trainers import NPOConfig, NPOTrainer

    task, cfg, tok = run.task, run.cfg, run.tokenizer
    known = task.known_facts(run.model, tok, run.seed)
    n = cfg["forget_facts"]
    forget, retain, rest = known[:n], known[n : 2 * n], known[2 * n :]
    selection, test = fact_split(rest)
    target = 0.5
    out = {"known_facts": len(known), "forget_target": target, "sweep": {}, "variants": {}}

    def train(method: str, lr: float) -> list[dict]:
        probe = FactProbe(task, tok, {"forget": forget, "selection": selection, "test": test}, cfg["npo_eval_every"])
        config = NPOConfig(
            output_dir=f"{run.tmp}/{method}", max_steps=cfg["npo_steps"], learning_rate=lr,
            per_device_train_batch_size=2, npo_level="token", retain_loss_type="nll", lr_scheduler_type="constant",
            max_length=96, seed=run.seed, **unlearning_loss(method),
            **task.QUIET,
        )  # fmt: skip
        trainer = NPOTrainer(
            run.fresh(), ref_model=run.fresh(), args=config, train_dataset=npo_unlearning.statements(forget, tok),
            retain_dataset=npo_unlearning.statements(retain), processing_class=tok, callbacks=[probe],
        )  # fmt: skip
        trainer.train()
        return probe.curve

    for method in ("npo", "ga"):
        curves = {f"{lr:g}": run.timed(f"{method}_{lr:g}", train, method, lr) for lr in lrs(method, cfg, chosen)}
        # choose the lr that keeps the most selection facts at the target forget rate (never reaching it ranks last)
        out["sweep"][method] = {
            lr: at_forget_rate(c, target, "selection_accuracy") if any(p["forget_rate"] >= target for p in c)
            else -1.0 + max(p["forget_rate"] for p in c)
            for lr, c in curves.items()
        }  # fmt: skip
        lr = best_lr(out["sweep"][method])
        curve = curves[lr]
        out["variants"][method] = {
            "lr": float(lr), "curve": curve, "test_accuracy_at_target": at_forget_rate(curve, target, "test_accuracy"),
            "final_forget_rate": curve[-1]["forget_rate"], "final_test_accuracy": curve[-1]["test_accuracy"],
        }  # fmt: skip
    return out


def run_adapters(run: Run, chosen: dict | None) -> dict:
    import aligner_style
    from peft import AdaptionPromptConfig, LoraConfig

    from hf_align.peft_tuners import AlignerConfig

    task, cfg, tok = run.task, run.cfg, run.tokenizer
    countries = sorted(task.CAPITALS)
    third = len(countries) // 3
    n = cfg["style_rows"]
    train_rows = run.train[:n] + task.fact_rows(countries[:third][:n])
    selection = run.selection[: n // 2] + task.fact_rows(countries[third : 2 * third])
    test = run.test[:n] + task.fact_rows(countries[2 * third :])
    data = aligner_style.styled_dataset(run.model, tok, train_rows)
    style, facts = aligner_style.measure(run.model, tok, test)
    out = {"before": {"style_rate": style, "fact_accuracy": facts}, "sweep": {}, "variants": {}}
    configs = {
        "aligner_n1": lambda: AlignerConfig(num_tokens=1, task_type="CAUSAL_LM"),
        "aligner_n10": lambda: AlignerConfig(num_tokens=10, task_type="CAUSAL_LM"),
        "lora_r8": lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        "llama_adapter": lambda: AdaptionPromptConfig(adapter_len=10, adapter_layers=28, task_type="CAUSAL_LM"),
    }
    for name, make in configs.items():
        trained = {}
        out["sweep"][name] = {}
        for lr in lrs(name, cfg, chosen):
            model = run.timed(f"{name}_{lr:g}", task.train_sft, run.fresh(), tok, data, run.args, f"{run.tmp}/{name}",
                              cfg["sft_steps"], lr, peft_config=make())  # fmt: skip
            s, f = aligner_style.measure(model, tok, selection)
            out["sweep"][name][f"{lr:g}"] = s + 1e-3 * f  # style first; facts break ties
            trained[f"{lr:g}"] = (model, model.get_nb_trainable_parameters()[0])
        lr = best_lr(out["sweep"][name])
        model, params = trained[lr]
        style, facts = aligner_style.measure(model, tok, test)
        out["variants"][name] = {"lr": float(lr), "style_rate": style, "fact_accuracy": facts, "parameters": params}
        del trained, model
    return out


def run_quark(run: Run, chosen: dict | None) -> dict:
    import numpy as np
    import quark_feedback
    from datasets import Dataset

    from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer

    task, cfg, tok = run.task, run.cfg, run.tokenizer
    out = {"before": run.reward(run.model, run.test), "sweep": {}}

    def train(lr: float):
        config = FeedbackConditionedConfig(
            output_dir=f"{run.tmp}/quark", feedback_type="quantile", num_quantiles=5, quantile_rule="quark",
            num_rounds=cfg["quark_rounds"], steps_per_round=cfg["quark_steps"], prompts_per_round=cfg["quark_prompts"],
            num_generations=4, max_completion_length=cfg["max_new_tokens"], per_device_train_batch_size=8,
            learning_rate=lr, beta=0.05, lr_scheduler_type="constant", seed=run.seed, **task.QUIET,
        )  # fmt: skip
        trainer = FeedbackConditionedTrainer(
            run.fresh(), config, Dataset.from_list(run.train), processing_class=tok,
            reward_funcs=quark_feedback.task_reward,
        )  # fmt: skip
        trainer.train()
        return trainer

    def conditioned(trainer, rows, **kw) -> float:
        return task.mean_reward(rows, trainer.generate([r["prompt"] for r in rows], do_sample=False, **kw))

    measured = {}  # every lr's test measures, so that only one trainer (policy + reference) is held at a time
    for lr in lrs("quark", cfg, chosen):
        trainer = run.timed(f"quark_{lr:g}", train, lr)
        out["sweep"][f"{lr:g}"] = conditioned(trainer, run.selection)
        worst = int(np.flatnonzero(trainer.pool.bin_counts())[-1])
        measured[f"{lr:g}"] = {
            "lr": lr, "best_bin": conditioned(trainer, run.test), "worst_bin": conditioned(trainer, run.test, feedback=worst),
            "unconditioned": conditioned(trainer, run.test, unconditioned=True), "worst_bin_index": worst,
            "bin_counts": trainer.pool.bin_counts().tolist(),
        }  # fmt: skip
        del trainer
    out["variants"] = {"quark": measured[best_lr(out["sweep"])]}
    return out


RUNNERS = {"allo": run_allo, "unlearning": run_unlearning, "adapters": run_adapters, "quark": run_quark}


def chosen_lrs(first: dict) -> dict[str, float]:
    """The lrs the first seed chose, per method of a part."""
    return {name: v["lr"] for name, v in first["variants"].items()}


def run_part(part: str, path: str, cfg: dict, log=print, save=None, chosen: dict | None = None) -> dict:
    """Every seed of one part: the first sweeps (unless ``chosen`` gives the lrs), the others rerun its choices.
    ``save(result)`` after each seed, so that a run stopped early keeps the seeds it finished."""
    seeds = {}
    for seed in cfg["seeds"]:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix=f"real_{part}_") as tmp:
            run = Run(path, cfg, seed, tmp)
            result = RUNNERS[part](run, chosen)
        result["timings"], result["wall_s"] = run.timings, round(time.time() - start, 1)
        seeds[str(seed)] = result
        chosen = chosen or chosen_lrs(result)
        log(f"[{part}] seed {seed} done in {result['wall_s'] / 60:.1f} min")
        if save is not None:
            save({"part": part, "seeds": seeds, "chosen_lrs": chosen})
    return {"part": part, "seeds": seeds, "chosen_lrs": chosen}


# ------------------------------------------------------------------------------------------------ summary
def stat(seeds: dict, *keys) -> tuple[float, float, int]:
    """Mean, std and count over seeds of ``seed_result[k0][k1]...`` (NaN values dropped)."""
    values = []
    for result in seeds.values():
        v = result
        for k in keys:
            v = v[k]
        if isinstance(v, (int, float)) and math.isfinite(v):
            values.append(float(v))
    return (*mean_std(values), len(values)) if values else (math.nan, math.nan, 0)


def summarize(parts: dict) -> dict:
    """Per part: mean ± std of each measure, and the claims' verdicts by the report's separation rule."""
    s: dict[str, Any] = {"claims": []}

    def claim(text: str, a, b, testbed: str):
        judged = verdict(a, b) if min(a[2], b[2]) > 1 else f"{min(a[2], b[2])} seed(s): no verdict"
        s["claims"].append({"claim": text, "a": a, "b": b, "verdict": judged, "testbed": testbed})

    if "allo" in parts:
        seeds = parts["allo"]["seeds"]
        allo = {n: {m: stat(seeds, "variants", n, m) for m in ("reward", "knowledge")} for n in
                ("dpo", "lora", "mask_top10", "mask_random10", "mask_bottom10", "allo_full")}  # fmt: skip
        allo["before"] = {m: stat(seeds, "before", m) for m in ("reward", "knowledge")}
        s["allo"] = allo
        r = {n: v["reward"] for n, v in allo.items()}
        claim("top-10 % mask > full DPO (reward)", r["mask_top10"], r["dpo"], "shown")
        claim("top-10 % mask > random 10 %", r["mask_top10"], r["mask_random10"], "shown")
        claim("top-10 % mask > bottom 10 %", r["mask_top10"], r["mask_bottom10"], "shown")
        claim("top-10 % mask > LoRA r=8", r["mask_top10"], r["lora"], "not measured")
        claim("full ALLO (forgetting + ε) > mask alone", r["allo_full"], r["mask_top10"], "not shown")
        claim("full ALLO > full DPO", r["allo_full"], r["dpo"], "shown")
        k = {n: v["knowledge"] for n, v in allo.items()}
        claim("top-10 % mask keeps more knowledge than full DPO", k["mask_top10"], k["dpo"], "shown (retain ppl)")
        ama = {"aligned": {m: stat(seeds, "ama", "aligned", m) for m in ("reward", "knowledge")}}
        for alpha in ("0.25", "0.5", "0.75"):
            ama[f"linear_{alpha}"] = {m: stat(seeds, "ama", "linear", alpha, m) for m in ("reward", "knowledge")}
        for name in ("partwise", "adaptive"):
            ama[name] = {m: stat(seeds, "ama", name, m) for m in ("reward", "knowledge")}
        s["ama"] = ama
        for name in ("partwise", "adaptive"):
            above = [a for a in ama if a.startswith("linear") and _dominates(ama[name], ama[a])]
            beaten = [a for a in ama if a.startswith("linear") and _dominates(ama[a], ama[name])]
            seeds_n = ama[name]["reward"][2]
            s["claims"].append({
                "claim": f"{name} merge above the linear front", "verdict":
                (f"{seeds_n} seed(s): no verdict" if seeds_n < 2 else "shown" if above and not beaten
                 else "shown not to hold" if beaten and not above else "not shown"),
                "detail": f"dominates {above or 'no linear α'}; dominated by {beaten or 'none'}",
                "testbed": "not shown",
            })  # fmt: skip
    if "unlearning" in parts:
        seeds = parts["unlearning"]["seeds"]
        u = {m: {k: stat(seeds, "variants", m, k) for k in
                 ("test_accuracy_at_target", "final_forget_rate", "final_test_accuracy")} for m in ("npo", "ga")}  # fmt: skip
        s["unlearning"] = u
        claim("NPO keeps more test facts than GA at equal forget rate", u["npo"]["test_accuracy_at_target"],
              u["ga"]["test_accuracy_at_target"], "not shown")  # fmt: skip
    if "adapters" in parts:
        seeds = parts["adapters"]["seeds"]
        a = {m: {k: stat(seeds, "variants", m, k) for k in ("style_rate", "fact_accuracy", "parameters")}
             for m in ("aligner_n1", "aligner_n10", "lora_r8", "llama_adapter")}  # fmt: skip
        a["before"] = {k: stat(seeds, "before", k) for k in ("style_rate", "fact_accuracy")}
        s["adapters"] = a
        claim("LoRA r=8 > Aligner N=1 on the style (the paper: ≈)", a["lora_r8"]["style_rate"],
              a["aligner_n1"]["style_rate"], "shown (so ≈ does not hold)")  # fmt: skip
        claim("Aligner N=1 > before (learns the style at all)", a["aligner_n1"]["style_rate"],
              a["before"]["style_rate"], "not shown (barely moves)")  # fmt: skip
        claim("Aligner N=10 > LLaMA-Adapter on the style", a["aligner_n10"]["style_rate"],
              a["llama_adapter"]["style_rate"], "not measured")  # fmt: skip
    if "quark" in parts:
        seeds = parts["quark"]["seeds"]
        q = {k: stat(seeds, "variants", "quark", k) for k in ("best_bin", "worst_bin", "unconditioned")}
        q["before"] = stat(seeds, "before")
        s["quark"] = q
        claim("Quark: best bin > before", q["best_bin"], q["before"], "shown")
        claim("Quark: best bin > worst populated bin", q["best_bin"], q["worst_bin"], "shown")
    return s


def _dominates(a: dict, b: dict) -> bool:
    """a at least b's mean in reward and knowledge, and better in one by the separation rule."""
    measures = ("reward", "knowledge")
    return all(a[m][0] >= b[m][0] for m in measures) and any(below(b[m], a[m]) for m in measures)


# ------------------------------------------------------------------------------------------------ report
def markdown(result: dict, heading: str = "##") -> list[str]:
    s = result["summary"]
    counts = {p: len(d["seeds"]) for p, d in result["parts"].items()}

    def ms(v) -> str:  # mean ± std over the seeds that gave it (the mean alone for one)
        return fmt(v, n=v[2])

    def ran(r: dict) -> str:
        m = r["machine"]
        return (f"{', '.join(r['parts'])}: {r['wall_s'] / 60:.0f} min wall on {m['cpus']} CPU cores, {m['jobs']} "
                f"process(es) × {m['threads']} thread, load {m['load_start']:.1f} → {m['load_end']:.1f}, "
                f"torch {m['torch']}")  # fmt: skip

    runs = runs_of(result)
    notes = "".join(f" {r['machine']['note']}" for r in runs if r["machine"].get("note"))
    lines = [
        f"{heading} On a real model: SmolLM2-135M-Instruct",
        "",
        f"`python -m benchmarks.fidelity.real_model` (seeds per part: {', '.join(f'{p} {c}' for p, c in counts.items())}; "
        f"{'; '.join(map(ran, runs))}). The examples' tasks (examples/real_task.py); lrs chosen on a "
        "selection split, tables on a disjoint test split; mean ± std over seeds; *shown* needs the two means apart "
        "by more than both stds together." + notes,
        "",
        "| claim | real model | verdict | testbed verdict |",
        "|---|---|---|---|",
    ]
    for c in s["claims"]:
        shown = c.get("detail") or f"{ms(c['a'])} vs {ms(c['b'])}"
        lines.append(f"| {c['claim']} | {shown} | **{c['verdict']}** | {c['testbed']} |")
    if "allo" in s:
        lines += ["", "| ALLO part | test reward | knowledge (known capitals kept) | lr |", "|---|---|---|---|"]
        chosen = result["parts"]["allo"]["chosen_lrs"]
        for name, v in s["allo"].items():
            lines.append(f"| {name} | {ms(v['reward'])} | {ms(v['knowledge'])} | {chosen.get(name, '')} |")
    if "ama" in s:
        lines += ["", "| AMA (α·base + (1−α)·DPO) | test reward | knowledge |", "|---|---|---|"]
        lines += [f"| {k} | {ms(v['reward'])} | {ms(v['knowledge'])} |" for k, v in s["ama"].items()]
    if "unlearning" in s:
        lines += ["", "| unlearning (retain NLL) | test facts kept at forget rate ≥ 0.5 | final forget rate | "
                  "final test facts |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {ms(v['test_accuracy_at_target'])} | {ms(v['final_forget_rate'])} | "
                  f"{ms(v['final_test_accuracy'])} |" for k, v in s["unlearning"].items()]  # fmt: skip
    if "adapters" in s:
        lines += [
            "",
            '| style (" Cheers!") | style rate | fact accuracy | trainable parameters |',
            "|---|---|---|---|",
        ]
        lines += [f"| {k} | {ms(v['style_rate'])} | {ms(v['fact_accuracy'])} | "
                  f"{v.get('parameters', (math.nan,))[0]:.0f} |" for k, v in s["adapters"].items()]  # fmt: skip
    if "quark" in s:
        lines += ["", "| Quark | test reward |", "|---|---|"]
        lines += [f"| {k} | {ms(v)} |" for k, v in s["quark"].items()]
    lines += ["", f"![real model]({result['plot']})"]
    return lines


def splice_section(report: str, section: list[str]) -> str:
    """``report`` (fidelity.md) with its real-model section replaced by ``section``, or put in before the caveats;
    the testbed sections around it are kept as they are (their per-section JSON is not committed, so the report
    cannot always be regenerated from disk)."""
    lines, heading = report.split("\n"), section[0]
    start = next((i for i, line in enumerate(lines) if line == heading), None)
    if start is None:
        start = end = next((i for i, line in enumerate(lines) if line.startswith("## Not shown here")), len(lines))
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join([*lines[:start], *section, "", *lines[end:]])


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hf_align.io import atomic_file

    s = result["summary"]
    panels = [k for k in ("allo", "ama", "unlearning", "adapters", "quark") if k in s]
    if not panels:
        return
    fig = Figure(figsize=(4.5 * len(panels), 3.8), dpi=100)
    for i, key in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if key == "allo":
            names = list(s["allo"])
            ax.barh(names, [s["allo"][n]["reward"][0] for n in names], xerr=[s["allo"][n]["reward"][1] for n in names])
            ax.set_xlabel("test reward")
            ax.set_title("ALLO and peers", fontsize=9)
        elif key == "ama":
            for name, v in s["ama"].items():
                ax.errorbar(v["knowledge"][0], v["reward"][0], xerr=v["knowledge"][1], yerr=v["reward"][1],
                            marker="s" if name.startswith("linear") else "o", label=name, capsize=2)  # fmt: skip
            ax.set_xlabel("knowledge kept")
            ax.set_ylabel("test reward")
            ax.legend(fontsize=6)
            ax.set_title("AMA merges", fontsize=9)
        elif key == "unlearning":
            seed, first = next(iter(result["parts"]["unlearning"]["seeds"].items()))
            for method, v in first["variants"].items():
                ax.plot([p["forget_rate"] for p in v["curve"]], [p["test_accuracy"] for p in v["curve"]], marker="o",
                        label=f"{method} (seed {seed})")  # fmt: skip
            ax.set_xlabel("forget rate")
            ax.set_ylabel("test facts kept")
            ax.legend(fontsize=7)
            ax.set_title("NPO vs GA", fontsize=9)
        elif key == "quark":
            names = list(s["quark"])
            ax.barh(names, [s["quark"][n][0] for n in names], xerr=[s["quark"][n][1] for n in names])
            ax.set_xlabel("test reward")
            ax.set_title("Quark: conditioned on a bin", fontsize=9)
        else:
            names = list(s["adapters"])
            ax.barh(names, [s["adapters"][n]["style_rate"][0] for n in names],
                    xerr=[s["adapters"][n]["style_rate"][1] for n in names])  # fmt: skip
            ax.set_xlabel("style rate")
            ax.set_title("Aligner vs LoRA", fontsize=9)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png")


# ------------------------------------------------------------------------------------------------ command line
def part_path(results: Path, part: str, quick: bool, seed: int | None = None) -> Path:
    """A worker's JSON: one part, all its seeds or (``seed``) one of them."""
    return results / f"fidelity_{NAME}{'_quick' if quick else ''}.{part}{'' if seed is None else f'.seed{seed}'}.json"


def read_part(results: Path, part: str, quick: bool) -> dict | None:
    """A part's seeds from its workers' files (one file per seed, or one for all), first seed's choices kept."""
    from hf_align.io import read_json

    files = sorted(results.glob(part_path(results, part, quick).name.replace(".json", ".seed*.json")))
    files = [part_path(results, part, quick)] * part_path(results, part, quick).exists() + files
    if not files:
        return None
    merged = {"part": part, "seeds": {}, "chosen_lrs": None}
    for data in map(read_json, files):
        merged["seeds"].update(data["seeds"])
        merged["chosen_lrs"] = merged["chosen_lrs"] or data["chosen_lrs"]
    merged["seeds"] = dict(sorted(merged["seeds"].items(), key=lambda kv: int(kv[0])))
    return merged


def schedule(cfg: dict, parts: list[str], jobs: int, command) -> dict[str, int]:
    """Run every (part, seed) as its own process, ``jobs`` at a time: each part's first seed (the sweep) first,
    longest part first; a later seed starts once its part's first seed has chosen the lrs. Returns exit codes."""
    first, rest = cfg["seeds"][0], cfg["seeds"][1:]
    pending = [(p, first) for p in parts] + [(p, s) for s in rest for p in parts]
    running: dict[tuple[str, int], subprocess.Popen] = {}
    codes: dict[str, int] = {}
    while pending or running:
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                codes[f"{key[0]}/seed{key[1]}"] = proc.returncode
                del running[key]
        # a later seed needs its part's first seed to have succeeded (and never runs if it failed)
        pending = [k for k in pending if k[1] == first or codes.get(f"{k[0]}/seed{first}", 0) == 0]
        ready = [k for k in pending if k[1] == first or codes.get(f"{k[0]}/seed{first}") == 0]
        while ready and len(running) < jobs:
            key = ready.pop(0)
            pending.remove(key)
            running[key] = subprocess.Popen(command(*key))
        time.sleep(2)
    return codes


def machine(jobs: int, threads: int, load_start: float) -> dict:
    import torch

    return {"cpus": os.cpu_count(), "jobs": jobs, "threads": threads, "torch": torch.__version__,
            "platform": platform.platform(), "load_start": load_start, "load_end": os.getloadavg()[0]}  # fmt: skip


def runs_of(section: dict) -> list[dict]:
    """The runs that gave a section's parts (a section written before runs were recorded is one run of them all)."""
    keys = ("settings", "machine", "wall_s")
    return section.get("runs") or [
        {"parts": [p for p in PARTS if p in section["parts"]], **{k: section[k] for k in keys}}
    ]


def combine(results: Path, quick: bool, run: dict, previous: dict | None = None) -> dict:
    """The section JSON: the parts ``run`` redid from their workers' files, every other part as ``previous`` (the
    section already on disk) has it, so that a run of one part never drops the others; summary, verdicts and plot."""
    from hf_align.io import write_json

    suffix = "_quick" if quick else ""
    redone = {p: data for p in run["parts"] if (data := read_part(results, p, quick)) is not None}
    kept = {p: d for p, d in (previous or {}).get("parts", {}).items() if p not in redone}  # a failed redo keeps it
    parts = {p: redone.get(p) or kept[p] for p in PARTS if p in redone or p in kept}
    earlier = [{**r, "parts": [p for p in r["parts"] if p in kept]} for r in runs_of(previous)] if previous else []
    runs = [r for r in earlier if r["parts"]] + [{**run, "parts": list(redone)}] * bool(redone)
    latest = runs[-1] if runs else run
    result = {"settings": latest["settings"], "machine": latest["machine"], "wall_s": latest["wall_s"], "runs": runs,
              "parts": parts, "summary": summarize(parts), "plot": f"fidelity{suffix}_{NAME}.png"}  # fmt: skip
    plot(result, results / result["plot"])
    write_json(results / f"fidelity_{NAME}{suffix}.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity.real_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, one lr, a step or two")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (the first sweeps)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (one per part and seed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--model", default=None, help="model folder (default: make real-model's)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--rewrite", action="store_true", help="only rebuild summary and plot from the JSON")
    parser.add_argument("--part_only", action="store_true", help=argparse.SUPPRESS)  # a worker: run, write, exit
    parser.add_argument("--chosen_from", type=Path, default=None, help=argparse.SUPPRESS)  # the first seed's JSON
    args = parser.parse_args(argv)
    import torch

    from hf_align.io import read_json, write_json
    from hf_align.testbed import real_model

    torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
    if args.seeds:
        cfg["seeds"] = list(args.seeds)
    section = args.results / f"fidelity_{NAME}{'_quick' if args.quick else ''}.json"
    if args.rewrite:
        old = read_json(section)  # every part as the JSON has it: the workers' files are not committed
        result = combine(args.results, args.quick, {"parts": []}, previous=old)
        print("\n".join(markdown(result)))
        return 0
    path = args.model or str(real_model.prepare())
    if args.part_only:
        chosen = read_json(args.chosen_from)["chosen_lrs"] if args.chosen_from else None
        for part in args.parts:
            seed = cfg["seeds"][0] if len(cfg["seeds"]) == 1 else None
            target = part_path(args.results, part, args.quick, seed)
            run_part(part, path, cfg, save=lambda result, target=target: write_json(target, result), chosen=chosen)
        return 0
    previous = read_json(section) if section.exists() else None  # its other parts stay as they are
    start, load_start = time.time(), os.getloadavg()[0]
    for part in args.parts:  # an earlier run's files would mix into this one's
        for stale in [part_path(args.results, part, args.quick), *args.results.glob(
                part_path(args.results, part, args.quick).name.replace(".json", ".seed*.json"))]:  # fmt: skip
            stale.unlink(missing_ok=True)

    def command(part: str, seed: int) -> list[str]:
        first = part_path(args.results, part, args.quick, cfg["seeds"][0])
        return [sys.executable, "-m", "benchmarks.fidelity.real_model", "--part_only", "--threads",
                str(args.threads), "--model", path, "--results", str(args.results), "--parts", part, "--seeds",
                str(seed)] + (["--quick"] if args.quick else []) + (
                ["--chosen_from", str(first)] if seed != cfg["seeds"][0] else [])  # fmt: skip

    codes = schedule(cfg, args.parts, max(1, args.jobs), command)
    run = {"parts": list(args.parts), "settings": cfg, "machine": machine(args.jobs, args.threads, load_start),
           "wall_s": round(time.time() - start, 1)}  # fmt: skip
    result = combine(args.results, args.quick, run, previous)
    print("\n".join(markdown(result)))
    print(json.dumps({"returncodes": codes}))
    report_md = args.results / f"fidelity{'_quick' if args.quick else ''}.md"
    if report_md.exists():
        report_md.write_text(splice_section(report_md.read_text(encoding="utf-8"), markdown(result)), encoding="utf-8")
        print(f"updated the real-model section of {report_md}")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
