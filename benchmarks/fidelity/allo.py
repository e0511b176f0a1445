"""ALLO's claims on the testbed, one budget for every variant (a section of ``python -m benchmarks.fidelity``).

    python -m benchmarks.fidelity.allo [--quick] [--seeds 0 1 2 3 4] [--rewrite]

Every variant trains the same steps on the same preference pairs (correct vs same-length wrong digits) and gets the
same lr sweep on the first seed, chosen on **held-out** prompts (disjoint from the test prompts; training pairs
exclude both) by the highest held-out mean reward; the other seeds rerun the chosen lr. Variants:

* **mask ablation**: full DPO (``trl.DPOTrainer``) vs ``MaskedDPOTrainer`` with the top / random / bottom 10 % of
  decoder rows by the accumulated |gradient| of a warm-up DPO (``MaskAccumulationCallback``);
* **ALLO's stages**: the warm-up mask alone; + key-token NPO forgetting (top 5 % mask, rewrite-diff key tokens of
  the rejected answers) before improving; + the improving stage's token selection ε (``rejected_token_ratio``);
  both (the full pipeline, recipes/allo/pipeline.yaml);
* **selection**: row vs element granularity, gradient vs weight-diff (|θ_warmup − θ_init|, ALLO's own) scores;
* **mask ratios** (ALLO's Figure 4): the improving mask's ratio (improving stage alone) and the forgetting mask's
  ratio (forgetting + improving at 10 %).

Writes ``benchmarks/results/fidelity_allo[_quick].json`` and ``fidelity[_quick]_allo.png``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.fidelity import common
from benchmarks.fidelity.common import RESULTS, below, best_lr, fmt, mean_std, prompt_splits, verdict
from hf_align.testbed import quiet_training_args


@dataclass(frozen=True)
class Variant:
    """One trained model: which mask (scores, select, ratio), whether a forgetting stage runs first, ALLO's ε."""

    name: str
    group: str
    score: tuple[str, str] | None = ("gradient", "row")  # (method, granularity); None: full DPO
    select: str = "top"  # "top", "bottom" or "random"
    ratio: float = 0.1
    forget_ratio: float | None = None
    epsilon: float | None = None
    label: str = ""


def variants(cfg: dict) -> list[Variant]:
    """The report's variants in table order (the first seed sweeps them in this order)."""
    eps = cfg["epsilon"]
    out = [
        Variant("dpo", "ablation", score=None, label="full DPO (every parameter)"),
        Variant("mask_top10", "ablation", label="top-10 % rows (warm-up mask alone)"),
        Variant("mask_random10", "ablation", select="random", label="random 10 % rows"),
        Variant("mask_bottom10", "ablation", select="bottom", label="bottom-10 % rows"),
        Variant("allo_forget", "stages", forget_ratio=0.05, label="+ key-token NPO forgetting"),
        Variant("allo_epsilon", "stages", epsilon=eps, label=f"+ token selection ε = {eps:g}"),
        Variant("allo_full", "stages", forget_ratio=0.05, epsilon=eps, label="full ALLO (forgetting + ε)"),
        Variant("mask_top10_element", "selection", score=("gradient", "element"), label="gradient, element"),
        Variant("mask_top10_wdiff", "selection", score=("weight_diff", "row"), label="weight diff, row"),
        Variant(
            "mask_top10_wdiff_element",
            "selection",
            score=("weight_diff", "element"),
            label="weight diff, element (ALLO's)",
        ),  # fmt: skip
    ]
    out += [
        Variant(f"improve_ratio_{r:g}", "improve_ratio", ratio=r, label=f"improving mask {r:.0%}")
        for r in cfg["improve_ratios"]
    ]
    out += [
        Variant(f"forget_ratio_{r:g}", "forget_ratio", forget_ratio=r, label=f"forgetting mask {r:.0%}")
        for r in cfg["forget_ratios"]
    ]
    return out


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            seeds=[0], num_pairs=128, warmup_steps=4, dpo_steps=8, lrs=[1e-3, 3e-3], forget_lrs=[3e-4],
            forget_steps=3, epsilon=0.5, improve_ratios=[0.05], forget_ratios=[0.1], test_prompts=32,
            heldout_prompts=32, retain_rows=16, warmup_lr=5e-4,
        )  # fmt: skip
    return dict(
        seeds=[0, 1, 2, 3, 4], num_pairs=512, warmup_steps=20, dpo_steps=60, lrs=[1e-4, 3e-4, 1e-3, 3e-3],
        forget_lrs=[3e-5, 1e-4, 3e-4, 1e-3], forget_steps=20, epsilon=0.5, improve_ratios=[0.02, 0.05, 0.2, 0.4],
        forget_ratios=[0.02, 0.1, 0.2], test_prompts=256, heldout_prompts=128, retain_rows=128, warmup_lr=5e-4,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------- metrics
class Evaluator:
    """Every model is scored on the same prompts with the same sampling seed; reference = the start model.

    ``heldout`` is the cheap score learning rates are chosen on: the mean reward on prompts the report never shows.
    """

    def __init__(self, tb, test_prompts: int, retain_rows: int, heldout_prompts: int = 0):
        self.tb = tb
        self.start = copy.deepcopy(tb.model).eval()
        self.prompts, self.heldout_prompts = prompt_splits(test_prompts, heldout_prompts)
        retain = tb.retain_dataset(retain_rows)
        self.retain = {"prompts": list(retain["prompt"]), "completions": list(retain["completion"])}

    def __call__(self, model) -> dict:
        from hf_align import testbed
        from hf_align.evaluation import evaluate_model

        r = evaluate_model(
            model, self.tb.tokenizer, self.prompts, [testbed.reward], ["testbed"], reference_model=self.start,
            retain=self.retain, seed=1234, max_new_tokens=10,
        )  # fmt: skip
        return {k: r[k] for k in ("mean_reward", "win_rate", "kl", "perplexity", "mean_length")}

    def heldout(self, model) -> float:
        from hf_align import testbed
        from hf_align.evaluation import evaluate_model

        r = evaluate_model(
            model, self.tb.tokenizer, self.heldout_prompts, [testbed.reward], ["testbed"], seed=1234, max_new_tokens=10
        )
        return r["mean_reward"]


# -------------------------------------------------------------------------------------------- training
def _dpo_common(output_dir: str, steps: int, seed: int) -> dict:
    return quiet_training_args(
        output_dir=output_dir, per_device_train_batch_size=16, max_steps=steps, beta=0.1,
        lr_scheduler_type="constant", logging_steps=1000,
        gradient_checkpointing=False, seed=seed,
    )  # fmt: skip


def train_dpo(tb, data, seed: int, steps: int, out: str, lr: float, callbacks=None):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(learning_rate=lr, **_dpo_common(out, steps, seed))
    trainer = DPOTrainer(
        model=copy.deepcopy(tb.model), ref_model=copy.deepcopy(tb.model), args=config, train_dataset=data,
        processing_class=tb.tokenizer, callbacks=callbacks or [],
    )  # fmt: skip
    trainer.train()
    return trainer.model.eval()


def warmup_scores(tb, data, seed: int, cfg: dict, score: tuple[str, str], out: str) -> dict:
    """ALLO's warm-up in miniature: DPO with MaskAccumulationCallback scoring rows or entries."""
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.scores import load_scores

    callback = MaskAccumulationCallback(method=score[0], granularity=score[1])
    train_dpo(tb, data, seed, cfg["warmup_steps"], out, lr=cfg["warmup_lr"], callbacks=[callback])
    scores, _ = load_scores(out)
    return scores


def train_masked(tb, data, seed: int, steps: int, out: str, mask, lr: float, model=None, epsilon=None):
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer
    from hf_align.trainers._model_copy import independent_copy

    config = MaskedDPOConfig(learning_rate=lr, rejected_token_ratio=epsilon, **_dpo_common(out, steps, seed))
    trainer = MaskedDPOTrainer(
        model=independent_copy(model if model is not None else tb.model), args=config, train_dataset=data,
        processing_class=tb.tokenizer, neuron_mask=mask,
    )  # fmt: skip
    trainer.train()
    return trainer.model.eval()


def forget_stage(tb, labelled, seed: int, cfg: dict, mask, lr: float, out: str):
    """ALLO's forgetting stage: token-level NPO on the rejected answers' key tokens, only the mask's neurons."""
    from hf_align.sparse_update import merge_deltas
    from hf_align.trainers import NPOConfig, NPOTrainer

    config = NPOConfig(**quiet_training_args(
        output_dir=out, per_device_train_batch_size=16, max_steps=cfg["forget_steps"], learning_rate=lr,
        weight_decay=0.0, lr_scheduler_type="constant", beta=0.1, npo_level="token", precompute_ref_log_probs=True,
        gradient_checkpointing=False,
        logging_steps=1000, seed=seed,
    ))  # fmt: skip
    trainer = NPOTrainer(
        copy.deepcopy(tb.model), args=config, train_dataset=labelled, processing_class=tb.tokenizer, neuron_mask=mask
    )
    trainer.train()
    return merge_deltas(trainer.model).eval()


def preference_pairs(tb, n: int, seed: int, exclude: set[str]):
    """``n`` testbed pairs whose prompts are neither test nor held-out prompts."""
    data = tb.preference_dataset(2 * n, seed=100 + seed)
    keep = [i for i, p in enumerate(data["prompt"]) if p not in exclude][:n]
    return data.select(keep)


class SeedRun:
    """One seed's models: warm-up scores and forgetting-stage models are computed once and shared by variants."""

    def __init__(self, tb, evaluator: Evaluator, cfg: dict, seed: int, tmp: str):
        from hf_align.key_tokens import label_dataset

        self.tb, self.evaluator, self.cfg, self.seed, self.tmp = tb, evaluator, cfg, seed, tmp
        exclude = set(evaluator.prompts) | set(evaluator.heldout_prompts)
        self.data = preference_pairs(tb, cfg["num_pairs"], seed, exclude)
        self.labelled = label_dataset(self.data, tb.tokenizer, "rewrite_diff")
        self._scores, self._forgot, self.timings = {}, {}, {}

    def scores(self, score: tuple[str, str]) -> dict:
        if score not in self._scores:
            start = time.time()
            out = f"{self.tmp}/warmup_{score[0]}_{score[1]}"
            self._scores[score] = warmup_scores(self.tb, self.data, self.seed, self.cfg, score, out)
            self.timings[f"warmup_{score[0]}_{score[1]}"] = round(time.time() - start, 1)
        return self._scores[score]

    def mask(self, v: Variant):
        from hf_align.masks import NeuronMask

        if v.select == "random":
            return NeuronMask.random(self.tb.model, v.ratio, v.score[1], seed=self.seed)
        return NeuronMask.from_scores(self.scores(v.score), v.ratio, select=v.select)

    def forgot(self, v: Variant, lr: float):
        """The forgetting stage's model for the variant's forgetting ratio at ``lr`` (the start model if none)."""
        if v.forget_ratio is None:
            return None
        key = (v.forget_ratio, lr)
        if key not in self._forgot:
            mask = self.mask(Variant("forget", "", ratio=v.forget_ratio))
            out = f"{self.tmp}/forget_{v.forget_ratio:g}_{lr:g}"
            self._forgot[key] = forget_stage(self.tb, self.labelled, self.seed, self.cfg, mask, lr, out)
        return self._forgot[key]

    def train(self, v: Variant, lr: float, forget_lr: float | None):
        out = f"{self.tmp}/{v.name}_{lr:g}"
        if v.score is None:
            return train_dpo(self.tb, self.data, self.seed, self.cfg["dpo_steps"], out, lr=lr)
        start = self.forgot(v, forget_lr)
        return train_masked(
            self.tb, self.data, self.seed, self.cfg["dpo_steps"], out, self.mask(v), lr, model=start,
            epsilon=v.epsilon,
        )  # fmt: skip


def sweep_seed(run: SeedRun, cfg: dict, log=print) -> dict:
    """The first seed: every variant at every lr (held-out reward), the chosen lr scored on the test prompts.

    The forgetting stage's lr is chosen first, on the stage-ablation variant ``allo_forget`` with the improving lr
    that the warm-up mask alone chose; every variant with a forgetting stage then uses it.
    """
    result = {"sweep": {}, "lr": {}, "forget_lr_sweep": {}, "test": {}}
    all_variants = variants(cfg)
    by_name = {v.name: v for v in all_variants}
    forget_lr = None
    for v in all_variants:
        if v.forget_ratio is not None and forget_lr is None:
            improve_lr = float(result["lr"]["mask_top10"])
            for flr in cfg["forget_lrs"]:
                model = run.train(by_name["allo_forget"], improve_lr, flr)
                result["forget_lr_sweep"][f"{flr:g}"] = run.evaluator.heldout(model)
            forget_lr = float(best_lr(result["forget_lr_sweep"]))
            result["forget_lr"] = forget_lr
            log(f"  seed {run.seed} forgetting lr {forget_lr:g}: {result['forget_lr_sweep']}")
        models = {}
        for lr in cfg["lrs"]:
            models[f"{lr:g}"] = run.train(v, lr, forget_lr)
            result["sweep"].setdefault(v.name, {})[f"{lr:g}"] = run.evaluator.heldout(models[f"{lr:g}"])
        chosen = best_lr(result["sweep"][v.name])
        result["lr"][v.name] = chosen
        result["test"][v.name] = run.evaluator(models[chosen])
        log(f"  seed {run.seed} {v.name}: lr {chosen} {result['sweep'][v.name]} → {result['test'][v.name]}")
    return result


def rerun_seed(run: SeedRun, cfg: dict, lrs: dict[str, str], forget_lr: float, log=print) -> dict:
    """A later seed: every variant at the lr the first seed chose."""
    result = {"test": {}}
    for v in variants(cfg):
        result["test"][v.name] = run.evaluator(run.train(v, float(lrs[v.name]), forget_lr))
        log(f"  seed {run.seed} {v.name}: {result['test'][v.name]}")
    return result


def run(tb, cfg: dict, log=print) -> dict:
    import tempfile

    start = time.time()
    evaluator = Evaluator(tb, cfg["test_prompts"], cfg["retain_rows"], cfg["heldout_prompts"])
    result = {"settings": cfg, "variants": [asdict(v) for v in variants(cfg)], "runs": {}}
    result["start"] = {"test": evaluator(tb.model), "heldout": evaluator.heldout(tb.model)}
    first = None
    for seed in cfg["seeds"]:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="fidelity-allo-") as tmp:
            seed_run = SeedRun(tb, evaluator, cfg, seed, tmp)
            if first is None:
                first = out = sweep_seed(seed_run, cfg, log)
            else:
                out = rerun_seed(seed_run, cfg, first["lr"], first.get("forget_lr"), log)
            out["timings_s"] = {**seed_run.timings, "total": round(time.time() - t0, 1)}
        result["runs"][str(seed)] = out
        log(f"seed {seed} done in {out['timings_s']['total']:.0f}s")
    result["lr"], result["forget_lr"] = first["lr"], first.get("forget_lr")
    result["wall_s"] = round(time.time() - start, 1)
    return result


# --------------------------------------------------------------------------------------------- report
METRICS = ("mean_reward", "win_rate", "kl", "perplexity")
GROUPS = {
    "ablation": "Mask ablation",
    "stages": "ALLO's stages (each on top of the warm-up mask alone, `mask_top10`)",
    "selection": "Selection: granularity and score (top 10 %)",
}


def summarize(result: dict) -> dict:
    """Per variant: mean ± std of each metric over the seeds (test prompts)."""
    runs = list(result["runs"].values())
    return {
        v["name"]: {k: mean_std([r["test"][v["name"]][k] for r in runs]) for k in METRICS}
        for v in result["variants"]
        if all(v["name"] in r["test"] for r in runs)
    }


def _labels(result: dict) -> dict[str, str]:
    return {v["name"]: v["label"] for v in result["variants"]}


def ratio_curves(result: dict) -> dict[str, list[tuple[float, str]]]:
    """(ratio, variant) per stage in ascending ratio, the 10 % / 5 % points taken from the stage ablation."""
    cfg = result["settings"]
    improve = sorted([(r, f"improve_ratio_{r:g}") for r in cfg["improve_ratios"]] + [(0.1, "mask_top10")])
    forget = sorted([(r, f"forget_ratio_{r:g}") for r in cfg["forget_ratios"]] + [(0.05, "allo_forget")])
    return {"improving": improve, "forgetting": forget}


def _row(name: str, label: str, lr: str, s: dict, n: int) -> str:
    cells = [fmt(s[k], 2 if k in ("kl", "perplexity") else 3, n) for k in METRICS]
    return f"| {name} | {label} | {lr} | " + " | ".join(cells) + " |"


def markdown(result: dict, heading: str = "##") -> list[str]:
    cfg, s, n = result["settings"], result["summary"], len(result["runs"])
    labels, lrs, start = _labels(result), result["lr"], result["start"]["test"]
    header = ["| variant | what | lr | mean reward | win rate vs start | KL(policy‖start) | retain perplexity |"]
    header.append("|---|---|---|---|---|---|---|")
    start_row = f"| start | the start model | – | {start['mean_reward']:.3f} | {start['win_rate']:.3f} | "
    start_row += f"{start['kl']:.2f} | {start['perplexity']:.2f} |"
    lines = [
        f"{heading} ALLO: masks, stages, selection and mask ratios (one budget for every variant)",
        "",
        f"`benchmarks/fidelity/allo.py`, {result['wall_s'] / 60:.1f} min. Every variant trains {cfg['dpo_steps']} "
        f"DPO steps (batch 16, β = 0.1, sigmoid, constant lr) on the same {cfg['num_pairs']} pairs per seed (correct "
        "vs same-length wrong digits; no test or held-out prompt among them). Masks come from a "
        f"{cfg['warmup_steps']}-step warm-up DPO (lr {cfg['warmup_lr']:g}) scored by `MaskAccumulationCallback`: "
        "accumulated |gradient| per decoder row unless the variant says otherwise; `weight diff` is "
        "|θ_warmup − θ_init|, ALLO's own score. The forgetting stage is token-level NPO (β = 0.1, "
        f"{cfg['forget_steps']} steps, precomputed reference) on the rewrite-diff key tokens of the rejected answers "
        "with the forgetting mask (top 5 % of the same scores) only; the improving stage then starts from its model. "
        f"ε is `rejected_token_ratio` = {cfg['epsilon']:g} (only that fraction of rejected tokens, those with the "
        "lowest log πθ − log π_ref, count).",
        "",
        f"Fair budget: one lr sweep {cfg['lrs']} for every variant, run on seed {cfg['seeds'][0]} and chosen by the "
        f"highest mean reward on {cfg['heldout_prompts']} **held-out** prompts (disjoint from the "
        f"{cfg['test_prompts']} test prompts); the forgetting stage's lr was chosen first from {cfg['forget_lrs']} "
        f"the same way (on `allo_forget`, improving at `mask_top10`'s lr): **{result.get('forget_lr', '–')}**. "
        f"The other seeds rerun the chosen lrs. Below: test prompts, mean ± std over seeds {cfg['seeds']}.",
        "",
    ]
    for group, title in GROUPS.items():
        names = [v["name"] for v in result["variants"] if v["group"] == group and v["name"] in s]
        if group == "selection":
            names = ["mask_top10", *names]
        lines += [f"**{title}**", "", *header, start_row]
        lines += [_row(m, labels[m].replace("|", "\\|"), lrs[m], s[m], n) for m in names]
        lines.append("")
    lines += [
        "**Mask ratios** (ALLO's Figure 4): the improving mask's ratio with the improving stage alone, and the "
        "forgetting mask's ratio with forgetting then improving at 10 %:",
        "",
        "| stage | ratio | lr | mean reward | retain perplexity |",
        "|---|---|---|---|---|",
    ]
    for stage, curve in ratio_curves(result).items():
        for ratio, m in curve:
            if m in s:
                lines.append(
                    f"| {stage} | {ratio:.0%} | {lrs[m]} | {fmt(s[m]['mean_reward'], 3, n)} | "
                    f"{fmt(s[m]['perplexity'], 2, n)} |"
                )
    first = result["runs"][str(cfg["seeds"][0])]
    sweep = [
        f"`{m}`: " + " · ".join(f"**{lr}: {r:.3f}**" if lr == lrs[m] else f"{lr}: {r:.3f}" for lr, r in rs.items())
        for m, rs in first["sweep"].items()
    ]
    forget_sweep = " · ".join(f"{lr}: {r:.3f}" for lr, r in first.get("forget_lr_sweep", {}).items())
    lines += [
        "",
        f"The lr sweep (seed {cfg['seeds'][0]}, held-out mean reward; start {result['start']['heldout']:.3f}; chosen "
        "in bold): " + "; ".join(sweep) + (f". Forgetting lr: {forget_sweep}." if forget_sweep else "."),
        "",
        f"![allo]({result.get('plot', 'fidelity_allo.png')})",
        "",
        "Findings (ALLO):",
        "",
        *result.get("findings", findings(result)),
        "",
    ]
    return lines


def findings(result: dict) -> list[str]:
    """Claim by claim, from the summary: *shown* / *not shown* / *shown not to hold* (the separation rule below)."""
    s, n = result["summary"], len(result["runs"])
    start = result["start"]["test"]

    def r(m, key="mean_reward"):
        return s[m][key]

    def f(m, key="mean_reward", digits=3):
        return f"{m} {fmt(r(m, key), digits, n)}"

    def judged(a, b):
        return verdict(a, b) if n > 1 else "not shown (a single seed)"

    def claim(text, a, b, detail):
        return f"- **{text} — {judged(a, b)}.** {detail}"

    out = [
        claim(
            "Mask order top > random > bottom", r("mask_top10"), r("mask_random10"),
            f"Reward {f('mask_top10')}, {f('mask_random10')}, {f('mask_bottom10')} (start {start['mean_reward']:.3f})"
            f"; random > bottom: {judged(r('mask_random10'), r('mask_bottom10'))}.",
        ),
        claim(
            "The warm-up's top-10 % rows alone match or beat full DPO", r("mask_top10"), r("dpo"),
            f"Reward {f('mask_top10')} vs {f('dpo')}; retain perplexity {f('mask_top10', 'perplexity', 2)} vs "
            f"{f('dpo', 'perplexity', 2)}.",
        ),
        claim(
            "Forgetting first (key-token NPO) helps the improving stage", r("allo_forget"), r("mask_top10"),
            f"Reward {f('allo_forget')} vs {f('mask_top10')}; retain perplexity {f('allo_forget', 'perplexity', 2)}.",
        ),
        claim(
            "The improving stage's token selection ε helps", r("allo_epsilon"), r("mask_top10"),
            f"Reward {f('allo_epsilon')} vs {f('mask_top10')}.",
        ),
        claim(
            "Full ALLO beats the warm-up mask alone", r("allo_full"), r("mask_top10"),
            f"Reward {f('allo_full')} vs {f('mask_top10')}.",
        ),
        claim(
            "Full ALLO beats full DPO (the paper's headline)", r("allo_full"), r("dpo"),
            f"Reward {f('allo_full')} vs {f('dpo')}; KL to the start {f('allo_full', 'kl', 2)} vs {f('dpo', 'kl', 2)}"
            f"; retain perplexity {f('allo_full', 'perplexity', 2)} vs {f('dpo', 'perplexity', 2)}.",
        ),
        claim(
            "Element masks beat row masks (gradient scores)", r("mask_top10_element"), r("mask_top10"),
            f"Reward {f('mask_top10_element')} vs {f('mask_top10')}.",
        ),
        claim(
            "Weight-diff scores (ALLO's) beat gradient scores (rows)", r("mask_top10_wdiff"), r("mask_top10"),
            f"Reward {f('mask_top10_wdiff')} vs {f('mask_top10')}; elements: {f('mask_top10_wdiff_element')} vs "
            f"{f('mask_top10_element')} ({judged(r('mask_top10_wdiff_element'), r('mask_top10_element'))}).",
        ),
    ]  # fmt: skip
    for stage, curve in ratio_curves(result).items():
        points = [(ratio, m) for ratio, m in curve if m in s]
        small = max((p for p in points if p[0] <= 0.1), key=lambda p: r(p[1])[0])
        large = max((p for p in points if p[0] > 0.1), key=lambda p: r(p[1])[0], default=None)
        best = max(points, key=lambda p: r(p[1])[0])
        detail = ", ".join(f"{ratio:.0%}: {fmt(r(m), 3, n)}" for ratio, m in points) + f"; best {best[0]:.0%}."
        if large is None:
            out.append(f"- **{stage.capitalize()} mask ratio:** {detail}")
        else:
            # "A small mask suffices": the best ratio ≤ 10 % is not separated below the best larger one.
            judged = "shown not to hold" if below(r(small[1]), r(large[1])) else "shown"
            judged = judged if n > 1 else "not shown (a single seed)"
            out.append(
                f"- **A small {stage} mask (≤ 10 %) does as well as a larger one — {judged}.** Reward by ratio: {detail}"
            )
    losses = [m for m in ("mask_top10", "allo_full") if below(r(m), r("dpo"))]
    out.append(
        "- **Where ALLO loses:** "
        + (f"{', '.join(losses)} below full DPO on reward. " if losses else "")
        + f"Retain perplexity (alignment tax; start {start['perplexity']:.2f}): "
        + ", ".join(f(m, "perplexity", 2) for m in ("dpo", "mask_top10", "allo_forget", "allo_full"))
        + "."
    )
    lrs = [f"{lr:g}" for lr in result["settings"]["lrs"]]
    edge = [f"{m} ({lr})" for m, lr in result["lr"].items() if lr in (lrs[0], lrs[-1])]
    if result.get("forget_lr") is not None and f"{result['forget_lr']:g}" in {
        f"{x:g}" for x in (result["settings"]["forget_lrs"][0], result["settings"]["forget_lrs"][-1])
    }:
        edge.append(f"the forgetting stage ({result['forget_lr']:g})")
    if edge:
        out.append(
            "- **Fair-budget caveat:** chosen lrs at an edge of the sweep (a better one may lie outside it): "
            + ", ".join(edge)
            + "."
        )
    out.append(
        f"- Rule: *shown* when the means differ the claimed way by more than the two stds together ({n} seeds); "
        "*shown not to hold* when they differ the other way by as much; *not shown* otherwise."
    )
    return out


COLORS = {"ablation": "tab:blue", "stages": "tab:orange", "selection": "tab:green"}


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from hf_align.io import atomic_file

    s, n, start = result["summary"], len(result["runs"]), result["start"]["test"]
    fig = Figure(figsize=(13, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 3, (1, 2))
    names = [v["name"] for v in result["variants"] if v["group"] in COLORS and v["name"] in s]
    colors = [COLORS[v["group"]] for v in result["variants"] if v["name"] in names]
    ax.bar(
        range(len(names)), [s[m]["mean_reward"][0] for m in names], yerr=[s[m]["mean_reward"][1] for m in names],
        color=colors, capsize=3,
    )  # fmt: skip
    ax.axhline(start["mean_reward"], color="black", linestyle="dashed")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean sampled reward (test prompts)")
    ax.set_ylim(min(start["mean_reward"], *(s[m]["mean_reward"][0] for m in names)) - 0.05, None)
    handles = [Patch(color=c, label=GROUPS[g].split(" (")[0]) for g, c in COLORS.items()]
    handles.append(Line2D([], [], color="black", linestyle="dashed", label="start model"))
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_title(f"ALLO variants, mean ± std over {n} seed(s)", fontsize=9)
    ax = fig.add_subplot(1, 3, 3)
    for (stage, curve), marker in zip(ratio_curves(result).items(), ("o", "s")):
        pts = [(ratio, m) for ratio, m in curve if m in s]
        ax.errorbar(
            [100 * p[0] for p in pts], [s[p[1]]["mean_reward"][0] for p in pts],
            yerr=[s[p[1]]["mean_reward"][1] for p in pts], marker=marker, capsize=3, label=f"{stage} mask",
        )  # fmt: skip
    ax.axhline(s["dpo"]["mean_reward"][0], color="tab:gray", linestyle="dotted", label="full DPO")
    ratios = sorted({100 * p[0] for curve in ratio_curves(result).values() for p in curve})
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{x:g}" for x in ratios])
    ax.minorticks_off()
    ax.set_xlabel("mask ratio (% of decoder rows)")
    ax.set_ylabel("mean sampled reward")
    ax.set_title("mask ratio per stage (ALLO Fig. 4)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png")


def refresh(result: dict) -> dict:
    """Summary and findings recomputed from the runs (after a change to the report code, no rerun needed)."""
    result["summary"] = summarize(result)
    result["findings"] = findings(result)
    return result


def run_section(quick: bool, results: Path = RESULTS, seeds: list[int] | None = None, log=print) -> dict:
    """Run; write ``fidelity_allo[_quick].json`` and ``fidelity[_quick]_allo.png`` under ``results``."""
    return common.run_section(sys.modules[__name__], "allo", quick, results, seeds, log)


def rewrite(quick: bool, results: Path = RESULTS) -> dict:
    return common.rewrite_section(sys.modules[__name__], "allo", quick, results)


def main(argv: list[str] | None = None) -> int:
    return common.section_main(
        sys.modules[__name__],
        "allo",
        argv,
        lambda result: all(math.isfinite(v["mean_reward"][0]) for v in result["summary"].values()),
    )


if __name__ == "__main__":
    raise SystemExit(main())
