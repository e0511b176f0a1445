"""Aligner vs its paper's baselines on the testbed, with the same budget for every adapter.

    python -m benchmarks.fidelity.adapters [--quick] [--seeds 0 1 2]

The Aligner paper (arXiv 2312.05503) claims that a few global tokens (N = 1 even) align *form and style* about as
well as LoRA, with a fraction of the parameters, and compares against LLaMA-Adapter. Here Aligner N = 1 and N = 10
(``hf_align.peft_tuners``), PEFT's LoRA r = 8 on all linear layers and PEFT's LLaMA-Adapter
(``AdaptionPromptConfig``, 10 prompt tokens in the same top 4 layers Aligner adapts) learn two styles by SFT:

* ``no_ugh`` (**global**): never end an answer with the suffix `` ugh``. One query-independent push (less
  `` ugh``, more EOS at the end of every answer) carries it.
* ``ugh_on_rev`` (**needs context**): end ``rev`` answers with `` ugh`` and ``+`` answers without it. Whether to
  emit the suffix depends on the prompt; a query-independent bias can only move both operations the same way.

With N = 1 the softmax over the single global token is identically 1, so each adapted layer adds the
query-independent vector ``o_proj(g ⊙ v_proj(P))`` to the residual stream: N = 1 can only shift a bias (later layers
process that shift non-linearly, so it is not strictly a logit bias). That is why the two styles tell it apart.
Which style is which is measured, not assumed: ``logit_bias`` (a trainable bias on the LM head, nothing else; a
reference, not a paper baseline) is the purest global bias. A diagnostic trains the prompt-style adapters with the
loss on the answer-ending token only, to tell "cannot represent the style" from "does not learn it under SFT".

Budget, the same for every adapter: one plain PyTorch loop (AdamW, no weight decay, constant lr, grad-norm clip 1,
batch 16, completion-only NLL with EOS), ``sft_steps`` steps; then DPO (sigmoid loss, β = 0.1, the frozen SFT model as
reference, ``dpo_steps`` steps) on the ``no_ugh`` style. The plain loop replaces trl's trainers because
``trl.SFTTrainer`` 1.16 always installs its fused LM head (``add_fused_lm_head``, no option turns it off) and
PEFT's ``AdaptionPromptModel`` then fails with ``'CausalLMOutputWithPast' object has no attribute 'log_probs'``.
Every adapter gets the same lr sweep on seed 0; the lr is chosen on **held-out** prompts (disjoint from the test
prompts and from the training data): for SFT the lowest held-out style error among the lrs whose held-out reward
stays within 0.05 of the start model's (a diverged model drops the suffix trivially), for DPO the highest held-out
reward. Seeds 1, 2, … rerun the chosen lr; seed 0's test numbers are from its sweep run. Reported on the test
prompts: style error, ` ugh` rates per operation, mean reward (one temperature-1 sample per prompt) and retain
perplexity over the answer digits of ``tb.retain_dataset`` (suffix and EOS excluded: it measures the arithmetic,
not the style), mean ± std over seeds.

Writes ``benchmarks/results/fidelity_adapters[_quick].json`` and ``fidelity[_quick]_adapters.png``;
``python -m benchmarks.fidelity`` runs this as its "adapters" section and renders it into ``fidelity.md``.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.fidelity import common
from benchmarks.fidelity.common import HELDOUT_SEED, TEST_SEED, collate, encode, token_logps
from benchmarks.fidelity.common import below as _below
from benchmarks.fidelity.common import fmt as _f
from benchmarks.fidelity.common import mean_std as _ms
from benchmarks.fidelity.common import prompt_splits as common_splits


RESULTS = common.RESULTS
SELECT_REWARD_DROP = 0.05
METHODS = ("aligner_n1", "aligner_n10", "lora_r8", "llama_adapter")
STYLES = {
    "no_ugh": "global: never end an answer with ` ugh`",
    "ugh_on_rev": "needs context: ` ugh` after `rev` answers only, never after `+` answers",
}


def settings(quick: bool) -> dict:
    common = dict(
        batch_size=16, beta=0.1, styles=list(STYLES), dpo_styles=["no_ugh"], methods=[*METHODS, "logit_bias"]
    )
    if quick:
        return dict(
            common, seeds=[0], lrs=[1e-3, 1e-2], dpo_lrs=[1e-3, 1e-2], sft_steps=10, dpo_steps=5, sft_rows=64,
            dpo_pairs=32, test_prompts=32, heldout_prompts=32, retain_rows=16, diag_methods=["aligner_n1"],
            diag_lrs=[1e-1],
        )  # fmt: skip
    return dict(
        common, seeds=[0, 1, 2], lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], dpo_lrs=[3e-4, 3e-3, 3e-2], sft_steps=200,
        dpo_steps=60, sft_rows=512, dpo_pairs=512, test_prompts=256, heldout_prompts=128, retain_rows=128,
        diag_methods=["aligner_n1", "aligner_n10", "llama_adapter"], diag_lrs=[1e-2, 1e-1],
    )  # fmt: skip


def peft_config(method: str):
    from peft import AdaptionPromptConfig, LoraConfig

    from hf_align.peft_tuners import AlignerConfig

    if method == "aligner_n1":
        return AlignerConfig(num_tokens=1, task_type="CAUSAL_LM")
    if method == "aligner_n10":
        return AlignerConfig(num_tokens=10, task_type="CAUSAL_LM")
    if method == "lora_r8":
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "llama_adapter":  # the top 4 of 6 layers: the layers Aligner adapts (start_layer = 2)
        return AdaptionPromptConfig(adapter_len=10, adapter_layers=4, task_type="CAUSAL_LM")
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------------------------ data
def styled(prompt: str, answer: str, style: str) -> str:
    """The completion a style wants for a correct answer."""
    from hf_align.testbed import FORGET_MARKER

    if style == "no_ugh":
        return answer
    if style == "ugh_on_rev":
        return answer + FORGET_MARKER if prompt.startswith("rev") else answer
    raise ValueError(f"unknown style {style!r}")


def style_error(prompt: str, completion: str, style: str) -> bool:
    from hf_align.testbed import has_forget_behaviour

    wants_ugh = style == "ugh_on_rev" and prompt.startswith("rev")
    return has_forget_behaviour(completion) != wants_ugh


def prompt_splits(cfg: dict) -> tuple[list[str], list[str]]:
    """Test prompts (the report's) and held-out prompts (lr selection only), disjoint."""
    return common_splits(cfg["test_prompts"], cfg["heldout_prompts"])


def sft_rows(tb, cfg: dict, style: str, seed: int, exclude: set[str]) -> list[tuple[list[int], int]]:
    data = tb.sft_dataset(2 * cfg["sft_rows"], seed=200 + seed)
    rows = [(p, c) for p, c in zip(data["prompt"], data["completion"]) if p not in exclude][: cfg["sft_rows"]]
    return [encode(tb.tokenizer, p, styled(p, c, style)) for p, c in rows]


def dpo_rows(tb, cfg: dict, style: str, seed: int, exclude: set[str]) -> list[tuple]:
    """Chosen = correct answer, rejected = same-length wrong digits, both in the style (DPO contrasts correctness)."""
    data = tb.preference_dataset(2 * cfg["dpo_pairs"], seed=100 + seed)
    out = []
    for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"]):
        if p not in exclude and len(out) < cfg["dpo_pairs"]:
            out.append((encode(tb.tokenizer, p, styled(p, c, style)), encode(tb.tokenizer, p, styled(p, r, style))))
    return out


def batches(rows: list, batch_size: int, steps: int, seed: int):
    """Shuffled epochs, ``steps`` batches, deterministic in ``seed``."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(rows)))
            rng.shuffle(extra)
            order += extra
        idx, order = order[:batch_size], order[batch_size:]
        yield [rows[i] for i in idx]


# -------------------------------------------------------------------------------------------- training
def build(tb, method: str, seed: int):
    from peft import get_peft_model

    import hf_align  # noqa: F401  (registers Aligner with PEFT)

    torch.manual_seed(seed)
    if method == "logit_bias":  # the reference global bias: one trainable bias on the LM head, nothing else
        model = copy.deepcopy(tb.model).requires_grad_(False)
        head = model.get_output_embeddings()
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        return model
    return get_peft_model(copy.deepcopy(tb.model), peft_config(method))


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in trainable(model))


def _step(optimizer, params, loss) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def train_sft(model, rows, cfg: dict, lr: float, seed: int, pad: int, steps: int | None = None) -> float:
    """Completion-only NLL (EOS included), mean over completion tokens; returns the last batch's loss."""
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(math.nan)
    for batch in batches(rows, cfg["batch_size"], steps or cfg["sft_steps"], seed):
        logps, mask = token_logps(model, *collate(batch, pad))
        loss = -logps.sum() / mask.sum()
        _step(optimizer, params, loss)
    model.eval()
    return float(loss.detach())


def train_dpo(model, rows, cfg: dict, lr: float, seed: int, pad: int) -> float:
    """Sigmoid DPO (β from cfg) against a frozen copy of the model as it is now: the SFT model."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(math.nan)
    for batch in batches(rows, cfg["batch_size"], cfg["dpo_steps"], seed):
        n = len(batch)
        ids, attn, labels = collate([c for c, _ in batch] + [r for _, r in batch], pad)
        logps, _ = token_logps(model, ids, attn, labels)
        with torch.no_grad():
            ref, _ = token_logps(reference, ids, attn, labels)
        ratio = logps.sum(-1) - ref.sum(-1)
        loss = -torch.nn.functional.logsigmoid(cfg["beta"] * (ratio[:n] - ratio[n:])).mean()
        _step(optimizer, params, loss)
    model.eval()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------ evaluation
METRICS = ("style_error", "ugh_rate", "ugh_rate_add", "ugh_rate_rev", "mean_reward", "perplexity")


class Judge:
    """Style error, ` ugh` rate per operation, reward and retain perplexity on one fixed prompt set and sampling seed."""

    def __init__(self, tb, prompts: list[str], seed: int, retain_rows: int):
        self.tb, self.prompts, self.seed = tb, prompts, seed
        retain = tb.retain_dataset(retain_rows)
        self.retain = (list(retain["prompt"]), list(retain["completion"]))

    def __call__(self, model, style: str, perplexity: bool = True) -> dict:
        from hf_align.evaluation import perplexity as corpus_perplexity
        from hf_align.testbed import has_forget_behaviour, reward
        from hf_align.testbed.evaluation import generate_completions

        if not finite(model):  # a diverged run: sampling from NaN logits would fail
            return {k: math.nan for k in METRICS} | {"diverged": True}
        model.eval()
        samples = generate_completions(model, self.tb.tokenizer, self.prompts, seed=self.seed)
        ugh = {"add": [], "rev": []}
        for prompt, sample in zip(self.prompts, samples):
            ugh["rev" if prompt.startswith("rev") else "add"].append(has_forget_behaviour(sample))
        out = {
            "style_error": statistics.fmean(style_error(p, s, style) for p, s in zip(self.prompts, samples)),
            "ugh_rate": statistics.fmean(has_forget_behaviour(s) for s in samples),
            "ugh_rate_add": statistics.fmean(ugh["add"]) if ugh["add"] else math.nan,
            "ugh_rate_rev": statistics.fmean(ugh["rev"]) if ugh["rev"] else math.nan,
            "mean_reward": statistics.fmean(reward(self.prompts, samples)),
        }
        if (
            perplexity
        ):  # the answer digits only (no suffix, no EOS): the retained arithmetic, one target for both styles
            out["perplexity"] = corpus_perplexity(model, self.tb.tokenizer, *self.retain, append_eos=False)[
                "perplexity"
            ]
        return out


def choose_sft(sweep: dict[str, dict], start_reward: float) -> str:
    """Lowest held-out style error among lrs keeping the held-out reward within SELECT_REWARD_DROP of the start's."""
    ok = [lr for lr, v in sweep.items() if v["heldout"]["mean_reward"] >= start_reward - SELECT_REWARD_DROP]
    pool = ok or [lr for lr, v in sweep.items() if not v["heldout"].get("diverged")] or list(sweep)
    return min(pool, key=lambda lr: (sweep[lr]["heldout"]["style_error"], -sweep[lr]["heldout"]["mean_reward"]))


def choose_dpo(sweep: dict[str, dict]) -> str:
    pool = [lr for lr, v in sweep.items() if not v["heldout"].get("diverged")] or list(sweep)
    return max(pool, key=lambda lr: sweep[lr]["heldout"]["mean_reward"])


def run_method(tb, cfg: dict, style: str, method: str, judges: dict, start_reward: float, exclude: set) -> dict:
    """One adapter on one style: SFT lr sweep on the first seed (chosen on held-out prompts), the other seeds at the
    chosen lr; then (with DPO) the same for DPO from each seed's SFT model. Test metrics per seed and stage."""
    pad, seeds = tb.tokenizer.pad_token_id, cfg["seeds"]
    test, heldout = judges["test"], judges["heldout"]
    t0 = time.time()
    sweep, kept = {}, {}
    for lr in cfg["lrs"]:
        model = build(tb, method, seeds[0])
        loss = train_sft(model, sft_rows(tb, cfg, style, seeds[0], exclude), cfg, lr, seeds[0], pad)
        sweep[f"{lr:g}"] = {"final_loss": loss, "heldout": heldout(model, style, perplexity=False)}
        kept[f"{lr:g}"] = model
    lr_sft = choose_sft(sweep, start_reward)
    models = {seeds[0]: kept.pop(lr_sft)}
    del kept
    for seed in seeds[1:]:
        models[seed] = build(tb, method, seed)
        train_sft(models[seed], sft_rows(tb, cfg, style, seed, exclude), cfg, float(lr_sft), seed, pad)
    runs = {seed: {"sft": test(m, style)} for seed, m in models.items()}
    entry = {
        "params": sum(p.numel() for p in trainable(models[seeds[0]])),
        "sft_sweep": sweep,
        "sft_lr": float(lr_sft),
    }
    if style in cfg["dpo_styles"]:
        dpo_sweep, dpo_kept = {}, {}
        for lr in cfg["dpo_lrs"]:
            model = copy.deepcopy(models[seeds[0]])
            loss = train_dpo(model, dpo_rows(tb, cfg, style, seeds[0], exclude), cfg, lr, seeds[0], pad)
            dpo_sweep[f"{lr:g}"] = {"final_loss": loss, "heldout": heldout(model, style, perplexity=False)}
            dpo_kept[f"{lr:g}"] = model
        lr_dpo = choose_dpo(dpo_sweep)
        runs[seeds[0]]["dpo"] = test(dpo_kept[lr_dpo], style)
        del dpo_kept
        for seed in seeds[1:]:
            train_dpo(models[seed], dpo_rows(tb, cfg, style, seed, exclude), cfg, float(lr_dpo), seed, pad)
            runs[seed]["dpo"] = test(models[seed], style)
        entry.update(dpo_sweep=dpo_sweep, dpo_lr=float(lr_dpo))
    entry["runs"] = {str(seed): v for seed, v in runs.items()}
    entry["seconds"] = round(time.time() - t0, 1)
    return entry


def style_token_diagnostic(tb, cfg: dict, judges: dict, exclude: set) -> dict:
    """Can the adapter *represent* ``no_ugh``? SFT with the loss on the answer-ending token only (EOS where the start
    model may say `` ugh``), seed 0, held-out prompts: the style alone, nothing else asked of the adapter."""
    pad, seed = tb.tokenizer.pad_token_id, cfg["seeds"][0]
    rows = [(ids, len(ids) - 1) for ids, _ in sft_rows(tb, cfg, "no_ugh", seed, exclude)]
    out = {}
    for method in cfg["diag_methods"]:
        for lr in cfg["diag_lrs"]:
            model = build(tb, method, seed)
            train_sft(model, rows, cfg, lr, seed, pad)
            out.setdefault(method, {})[f"{lr:g}"] = judges["heldout"](model, "no_ugh")
    return out


def run(tb, cfg: dict, log=print) -> dict:
    started = time.time()
    test, heldout = prompt_splits(cfg)
    exclude = set(test) | set(heldout)
    judges = {
        "test": Judge(tb, test, TEST_SEED, cfg["retain_rows"]),
        "heldout": Judge(tb, heldout, HELDOUT_SEED, cfg["retain_rows"]),
    }
    result: dict = {"settings": cfg, "start": {}, "styles": {}, "params": {}}
    for style in cfg["styles"]:
        result["start"][style] = {
            "test": judges["test"](tb.model, style),
            "heldout": judges["heldout"](tb.model, style),
        }
        start_reward = result["start"][style]["heldout"]["mean_reward"]
        result["styles"][style] = {}
        for method in cfg["methods"]:
            entry = run_method(tb, cfg, style, method, judges, start_reward, exclude)
            result["styles"][style][method] = entry
            result["params"][method] = entry["params"]
            errors = [round(r["sft"]["style_error"], 3) for r in entry["runs"].values()]
            log(
                f"  adapters {style} {method}: SFT lr {entry['sft_lr']:g}"
                + (f", DPO lr {entry['dpo_lr']:g}" if "dpo_lr" in entry else "")
                + f", test style error {errors} ({entry['seconds']:.0f}s)",
                flush=True,
            )
    if cfg["diag_methods"]:
        t0 = time.time()
        result["style_token_only"] = style_token_diagnostic(tb, cfg, judges, exclude)
        log(f"  adapters style-token diagnostic ({time.time() - t0:.0f}s)", flush=True)
    result["summary"] = summarize(result)
    result["wall_s"] = round(time.time() - started, 1)
    result["findings"] = findings(result)
    return result


# --------------------------------------------------------------------------------------------- report
def ordered(result: dict, style: str) -> list[str]:
    """The methods of a style in the settings' order (a JSON round trip sorts the keys)."""
    return [m for m in result["settings"]["methods"] if m in result["styles"][style]]


def summarize(result: dict) -> dict:
    out = {}
    for style in (st for st in result["settings"]["styles"] if st in result["styles"]):
        out[style] = {}
        for method in ordered(result, style):
            runs = list(result["styles"][style][method]["runs"].values())
            out[style][method] = {
                stage: {k: _ms([r[stage][k] for r in runs]) for k in METRICS}
                for stage in ("sft", "dpo")
                if stage in runs[0]
            }
    return out


def versus_lora(s: dict, start: float, method: str, n: int) -> str:
    """The paper's claim for one adapter on one style: its style error ≈ LoRA's (within 0.05), LoRA having learnt it;
    "shown not to hold" when it is worse by more than 0.05 and the two are separated by their stds."""
    m, lora = s[method]["sft"]["style_error"], s["lora_r8"]["sft"]["style_error"]
    if not lora[0] < start - 0.05:
        verdict = "not shown (LoRA does not learn this style either)"
    elif abs(m[0] - lora[0]) <= 0.05:
        verdict = "shown"
    elif m[0] - lora[0] > 0.05 and _below(lora, m):
        verdict = "shown not to hold"
    else:
        verdict = "not shown"
    return verdict + (" (one seed, no spread)" if n == 1 else "")


def findings(result: dict) -> list[str]:
    """Claim by claim, from the numbers (so the text never outruns them)."""
    s, start, params, cfg = result["summary"], result["start"], result["params"], result["settings"]
    n = len(cfg["seeds"])
    out = []
    if "no_ugh" in s and "lora_r8" in s["no_ugh"]:
        lora, rate0 = s["no_ugh"]["lora_r8"]["sft"]["ugh_rate"], start["no_ugh"]["test"]["ugh_rate"]
        ok = lora[0] + lora[1] < rate0 / 2
        out.append(
            f"- **The testbed tells adapters apart — {'shown' if ok else 'not shown'}.** LoRA r=8 on all linear layers "
            f"({params['lora_r8']:,} params) takes the ` ugh` rate {rate0:.3f} → {_f(lora, n=n)} in {cfg['sft_steps']} "
            "SFT steps" + (", below half the start's." if ok else ", not below half the start's.")
        )
    if "logit_bias" in result["params"] and {"no_ugh", "ugh_on_rev"} <= set(s):
        g = s["no_ugh"]["logit_bias"]["sft"]["style_error"]
        c = s["ugh_on_rev"]["logit_bias"]["sft"]["style_error"]
        g0, c0 = start["no_ugh"]["test"]["style_error"], start["ugh_on_rev"]["test"]["style_error"]
        global_ok, context_fails = g[0] < g0 / 2, c[0] > c0 - 0.05
        verdict = "shown" if global_ok and context_fails else "not shown"
        out.append(
            f"- **Which style is which — {verdict}.** A trainable bias on the LM head ({params['logit_bias']} params, "
            f"the purest global bias; a reference, not a paper baseline) takes the `no_ugh` error {g0:.3f} → "
            f"{_f(g, n=n)} ({'a global bias carries it' if global_ok else 'it does not carry it'}) and the `ugh_on_rev` "
            f"error {c0:.3f} → {_f(c, n=n)} ({'it cannot: the rule needs the prompt' if context_fails else 'it helps'})."
        )
    for style in s:
        if not {"aligner_n1", "lora_r8"} <= set(s[style]):
            continue
        base = start[style]["test"]["style_error"]
        kind = "a global bias can carry it" if style == "no_ugh" else "needs context"
        others = ", ".join(
            f"{m} ({params[m]:,}) {_f(s[style][m]['sft']['style_error'], n=n)} — vs LoRA {versus_lora(s[style], base, m, n)}"
            for m in ("aligner_n10", "llama_adapter")
            if m in s[style]
        )
        out.append(
            f"- **Aligner N=1 ≈ LoRA on `{style}` ({kind}) — {versus_lora(s[style], base, 'aligner_n1', n)}.** Style error "
            f"after SFT: start {base:.3f}, Aligner N=1 ({params['aligner_n1']:,} params) "
            f"{_f(s[style]['aligner_n1']['sft']['style_error'], n=n)}, LoRA r=8 "
            f"{_f(s[style]['lora_r8']['sft']['style_error'], n=n)}" + (f"; {others}." if others else ".")
        )
    diag = result.get("style_token_only", {})
    if diag:
        h0 = start["no_ugh"]["heldout"]
        parts, broke = [], []
        for method in (m for m in cfg["methods"] if m in diag):
            lr, v = min(diag[method].items(), key=lambda kv: (kv[1]["style_error"], -kv[1]["mean_reward"]))
            parts.append(
                f"{method} (lr {lr}) style error {v['style_error']:.3f}, reward {v['mean_reward']:.3f}, digit "
                f"perplexity {v['perplexity']:.1f}"
            )
            if v["style_error"] < h0["style_error"] / 2 and v["mean_reward"] < h0["mean_reward"] - 0.1:
                broke.append(method)
        out.append(
            "- **Can the prompt-style adapters represent `no_ugh` at all?** Trained with the loss on the answer-ending "
            f"token only (diagnostic, seed {cfg['seeds'][0]}, held-out prompts; start: style error "
            f"{h0['style_error']:.3f}, reward {h0['mean_reward']:.3f}, digit perplexity {h0['perplexity']:.2f}): "
            + "; ".join(parts)
            + "."
            + (
                f" {', '.join(broke)} can drop the suffix, but only at the cost of the answers themselves: what they "
                "add to the attention output moves the answer-ending decision and the digits together, so under the "
                "full SFT loss they stay near the start. LLaMA-Adapter's prompt is query-dependent and fails alike, "
                "so the query-independence of N = 1 is not the whole reason on this model."
                if "llama_adapter" in broke and "aligner_n1" in broke
                else f" {', '.join(broke)} drop the suffix only at the cost of the answers themselves."
                if broke
                else ""
            )
        )
    edges = []
    for style in s:
        for method in ordered(result, style):
            entry = result["styles"][style][method]
            for stage, lrs in (("sft", cfg["lrs"]), ("dpo", cfg["dpo_lrs"])):
                lr = entry.get(f"{stage}_lr")
                if lr is not None and len(lrs) > 1 and lr in (min(lrs), max(lrs)):
                    edges.append(f"{method} {stage.upper()} on `{style}` ({lr:g})")
    if edges:
        out.append(
            "- **Fair-budget caveat:** chosen lrs at an edge of the sweep (a better one may lie outside it): "
            + ", ".join(edges)
            + "."
        )
    if "no_ugh" in s and all("dpo" in v for v in s["no_ugh"].values()):
        v = s["no_ugh"]
        start_r, start_p = start["no_ugh"]["test"]["mean_reward"], start["no_ugh"]["test"]["perplexity"]
        out.append(
            f"- **SFT then DPO (`no_ugh`), reward** (start {start_r:.3f}): "
            + "; ".join(
                f"{m} {_f(x['sft']['mean_reward'], n=n)} → {_f(x['dpo']['mean_reward'], n=n)}" for m, x in v.items()
            )
            + f". Retain perplexity of the answer digits after DPO (start {start_p:.2f}): "
            + ", ".join(f"{m} {_f(x['dpo']['perplexity'], 2, n)}" for m, x in v.items())
            + "."
        )
        if {"aligner_n1", "llama_adapter"} <= set(v):
            a1, la = v["aligner_n1"]["dpo"]["mean_reward"], v["llama_adapter"]["dpo"]["mean_reward"]
            same = not (_below(a1, la) or _below(la, a1))
            out.append(
                "- **Aligner N=1 vs LLaMA-Adapter (the paper's direct baseline) — "
                + ("shown" if same else "not shown")
                + f".** Reward after SFT + DPO {_f(a1, n=n)} vs {_f(la, n=n)} with {params['aligner_n1']:,} vs "
                f"{params['llama_adapter']:,} parameters"
                + (
                    ", not separated: as good with 1/" + f"{params['llama_adapter'] // params['aligner_n1']} of them"
                    if same
                    else ""
                )
                + "; both stay far below LoRA, and neither learns the style."
            )
        gained = [m for m in v if _below(v[m]["sft"]["mean_reward"], v[m]["dpo"]["mean_reward"])]
        lost = [m for m in v if _below(v[m]["dpo"]["mean_reward"], v[m]["sft"]["mean_reward"])]
        out.append(
            f"- **DPO after SFT ({cfg['dpo_steps']} steps):** raises the reward by more than the stds for "
            + (", ".join(gained) or "none")
            + "; lowers it for "
            + (", ".join(lost) or "none")
            + " (each at its held-out-best DPO lr)."
        )
        papers = [m for m in METHODS if m in v]
        best = max(papers, key=lambda m: v[m]["dpo"]["mean_reward"][0])
        losers = [
            m
            for m in ("aligner_n1", "aligner_n10")
            if m in v and _below(v[m]["dpo"]["mean_reward"], v[best]["dpo"]["mean_reward"])
        ]
        out.append(
            f"- **Where Aligner loses (reward):** the highest reward after SFT + DPO among the paper's methods is "
            f"{best}'s"
            + (
                f"; {', '.join(losers)} end below it by more than one std each."
                if losers
                else "; Aligner is not separated from it by more than one std."
            )
            + f" Aligner N=1 trains {params.get('aligner_n1', 0):,} parameters, LoRA r=8 {params.get('lora_r8', 0):,}."
        )
    out.append(
        f"- Spread: mean ± std over {n} seed(s) (data draw, data order and adapter init); 'separated' means the means "
        "differ by more than the two stds together, a weak test with 3 seeds."
    )
    return out


def _cells(v: dict | None, n: int) -> list[str]:
    if v is None:
        return ["–", "–"]
    return [_f(v["mean_reward"], n=n), _f(v["style_error"], n=n)]


def markdown(result: dict, heading: str = "##") -> list[str]:
    cfg, s, start, params = result["settings"], result["summary"], result["start"], result["params"]
    n = len(cfg["seeds"])
    lines = [
        f"{heading} Aligner vs its paper's baselines (SFT, then DPO; one budget for every adapter)",
        "",
        f"`benchmarks/fidelity/adapters.py`, {result['wall_s'] / 60:.1f} min. Adapters: Aligner N=1 and N=10 "
        "(`hf_align.peft_tuners`, layers 2–5), LoRA r=8 α=16 on all linear layers, PEFT's LLaMA-Adapter "
        "(`AdaptionPromptConfig`, 10 prompt tokens in the top 4 layers, the baseline of the Aligner paper) and, as a "
        "reference for *what a global bias can do*, a trainable bias on the LM head (`logit_bias`). One plain training "
        f"loop for all (AdamW, no weight decay, constant lr, grad-norm clip 1, batch {cfg['batch_size']}): SFT "
        f"{cfg['sft_steps']} steps on {cfg['sft_rows']} correct answers written in the style (completion-only NLL + "
        f"EOS); then, for `{'`, `'.join(cfg['dpo_styles'])}`, DPO {cfg['dpo_steps']} steps (sigmoid, β = {cfg['beta']}, "
        f"{cfg['dpo_pairs']} pairs: correct vs same-length wrong digits, both in the style; the SFT model as reference). "
        "`trl.SFTTrainer` 1.16 always installs its fused LM head (`add_fused_lm_head`; no option turns it off), and "
        "PEFT's LLaMA-Adapter then fails (`'CausalLMOutputWithPast' object has no attribute 'log_probs'`): hence one "
        "plain loop for every adapter alike.",
        "",
        f"Fair budget: the same steps and the same lr sweep for every adapter — SFT {cfg['lrs']}, DPO {cfg['dpo_lrs']} — "
        f"run on seed {cfg['seeds'][0]} and chosen on {cfg['heldout_prompts']} **held-out** prompts (disjoint from the "
        f"{cfg['test_prompts']} test prompts; training rows exclude both): SFT — the lowest held-out style error among "
        f"the lrs whose held-out reward stays within {SELECT_REWARD_DROP} of the start's (a broken model drops the "
        "suffix trivially); DPO — the highest held-out reward. The other seeds rerun the chosen lr. Everything below "
        f"is on the test prompts, {'mean ± std over seeds ' + str(cfg['seeds']) if n > 1 else 'one seed'}: one "
        "temperature-1 sample per prompt; style error = fraction of samples whose ` ugh` ending disagrees with the "
        f"style; retain perplexity over the answer digits of {cfg['retain_rows']} `tb.retain_dataset` rows (no suffix, "
        "no EOS: the arithmetic, not the style). Rewards are sampled as in the NPO table (`tb.mean_reward`'s sampler), "
        "so the start model's differs a little from the DPO/AMA tables (`hf_align.evaluation`'s).",
        "",
        "Styles: " + "; ".join(f"`{k}` — {v}" for k, v in STYLES.items() if k in s) + ". With N = 1 the softmax over "
        "the one global token is identically 1, so each adapted layer adds the query-independent vector "
        "`o_proj(g ⊙ v_proj(P))` to the residual stream: N = 1 is a bias inside the network (later layers process it "
        "non-linearly), not on the logits.",
        "",
        "| style | adapter | trainable params | SFT lr | style error after SFT | ` ugh` on `+` / `rev` after SFT "
        "| reward after SFT | DPO lr | reward after DPO | style error after DPO | retain ppl (last stage) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for style, methods in s.items():
        st = start[style]["test"]
        lines.append(
            f"| {style} | start model | – | – | {st['style_error']:.3f} | {st['ugh_rate_add']:.2f} / "
            f"{st['ugh_rate_rev']:.2f} | {st['mean_reward']:.3f} | – | – | – | {st['perplexity']:.2f} |"
        )
        for method, v in methods.items():
            entry, dpo = result["styles"][style][method], v.get("dpo")
            sft = v["sft"]
            cells = [
                style, method, f"{params[method]:,}", f"{entry['sft_lr']:g}", _f(sft["style_error"], n=n),
                f"{_f(sft['ugh_rate_add'], 2, n)} / {_f(sft['ugh_rate_rev'], 2, n)}", _f(sft["mean_reward"], n=n),
                f"{entry['dpo_lr']:g}" if dpo else "–", *_cells(dpo, n), _f((dpo or sft)["perplexity"], 2, n),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The lr sweeps (seed {cfg['seeds'][0]}, held-out prompts; lr: style error / reward; the chosen lr in bold):",
        "",
        "| style | adapter | stage | sweep |",
        "|---|---|---|---|",
    ]
    for style in s:
        for method in ordered(result, style):
            entry = result["styles"][style][method]
            for stage in ("sft", "dpo"):
                if f"{stage}_sweep" not in entry:
                    continue
                chosen, cells = f"{entry[f'{stage}_lr']:g}", []
                for lr, v in sorted(entry[f"{stage}_sweep"].items(), key=lambda kv: float(kv[0])):
                    text = f"{lr}: {v['heldout']['style_error']:.3f} / {v['heldout']['mean_reward']:.3f}"
                    cells.append(f"**{text}**" if lr == chosen else text)
                lines.append(f"| {style} | {method} | {stage} | " + " · ".join(cells) + " |")
    diag = result.get("style_token_only")
    if diag:
        h0 = start["no_ugh"]["heldout"]
        lines += [
            "",
            "Diagnostic — can the prompt-style adapters *represent* `no_ugh`? SFT with the loss on the answer-ending "
            f"token only (EOS), seed {cfg['seeds'][0]}, {cfg['sft_steps']} steps, held-out prompts (start: style error "
            f"{h0['style_error']:.3f}, reward {h0['mean_reward']:.3f}, digit perplexity {h0['perplexity']:.2f}):",
            "",
            "| adapter | lr | style error | reward | digit perplexity |",
            "|---|---|---|---|---|",
        ]
        for method in (m for m in cfg["methods"] if m in diag):
            for lr, v in diag[method].items():
                lines.append(
                    f"| {method} | {lr} | {v['style_error']:.3f} | {v['mean_reward']:.3f} | {v['perplexity']:.2f} |"
                )
    lines += ["", f"![adapters]({result['plot']})" if result.get("plot") else "", "", "Findings (Aligner):", ""]
    lines += [*result["findings"], ""]
    return lines


COLORS = {
    "aligner_n1": "tab:blue", "aligner_n10": "tab:cyan", "lora_r8": "tab:orange", "llama_adapter": "tab:green",
    "logit_bias": "tab:gray",
}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hf_align.io import atomic_file

    s, start, cfg = result["summary"], result["start"], result["settings"]
    styles = list(s)
    methods = list(s[styles[0]])
    groups = [(st, "sft") for st in styles] + [(st, "dpo") for st in styles if st in cfg["dpo_styles"]]
    kinds = {"no_ugh": "global", "ugh_on_rev": "context"}
    labels = {
        (st, stage): f"{st} ({kinds.get(st, '?')})\n{'SFT' if stage == 'sft' else 'SFT + DPO'}" for st, stage in groups
    }
    fig = Figure(figsize=(17, 4.3), dpi=100)
    FigureCanvasAgg(fig)
    width = 0.8 / len(methods)
    panels = (
        ("style_error", "style error (fraction of samples)", [(st, "sft") for st in styles]),
        ("mean_reward", "mean sampled reward (0–1)", groups),
        ("perplexity", "retain perplexity, answer digits", groups),
    )
    for k, (key, ylabel, cols) in enumerate(panels):
        ax = fig.add_subplot(1, 4, k + 1)
        for j, method in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(cols))]
            rows = [s[st][method][stage] for st, stage in cols]
            means = [r[key][0] for r in rows]
            ax.bar(xs, means, width, yerr=[r[key][1] for r in rows], capsize=3, color=COLORS.get(method), label=method)
            if key == "style_error":  # a zero bar is invisible: print every mean
                for x, y in zip(xs, means):
                    ax.annotate(f"{y:.2f}", (x, y), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
        for i, (st, _) in enumerate(cols):
            ax.hlines(start[st]["test"][key], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                      label="start model" if i == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(cols)), [labels[c] for c in cols], fontsize=8)
        ax.set_ylabel(ylabel)
        if key == "style_error":
            ax.set_title("style after SFT (lower is better)", fontsize=9)
            ax.legend(fontsize=7)
        elif key == "mean_reward":
            ax.set_title("reward (higher is better)", fontsize=9)
        else:
            ax.set_title("retained arithmetic (lower is better)", fontsize=9)
    ax = fig.add_subplot(1, 4, 4)
    for method in methods:
        sweep = result["styles"][styles[0]][method]["sft_sweep"]
        lrs = sorted(sweep, key=float)
        errors = [sweep[lr]["heldout"]["style_error"] for lr in lrs]
        ax.plot([float(lr) for lr in lrs], errors, marker="o", color=COLORS.get(method), label=method)
    ax.axhline(start[styles[0]]["heldout"]["style_error"], color="black", linestyle="dashed", label="start model")
    ax.set_xscale("log")
    ax.set_xlabel("SFT learning rate")
    ax.set_ylabel("held-out style error")
    ax.set_title(f"lr sweep, {styles[0]}, seed {cfg['seeds'][0]} (selection split)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(
        f"Adapters with one budget: {cfg['sft_steps']} SFT + {cfg['dpo_steps']} DPO steps, the same lr sweep; "
        f"test prompts, mean ± std over {len(cfg['seeds'])} seed(s)",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png")


def run_section(quick: bool, results: Path = RESULTS, seeds: list[int] | None = None, log=print) -> dict:
    """Run; write ``fidelity_adapters[_quick].json`` and ``fidelity[_quick]_adapters.png`` under ``results``."""
    return common.run_section(sys.modules[__name__], "adapters", quick, results, seeds, log)


def refresh(result: dict) -> dict:
    """Summary and findings recomputed from the runs (after a change to the report code, no rerun needed)."""
    result["summary"] = summarize(result)
    result["findings"] = findings(result)
    return result


def rewrite(quick: bool, results: Path = RESULTS) -> dict:
    return common.rewrite_section(sys.modules[__name__], "adapters", quick, results)


def main(argv: list[str] | None = None) -> int:
    return common.section_main(
        sys.modules[__name__],
        "adapters",
        argv,
        lambda result: all(
            math.isfinite(v["sft"]["mean_reward"][0]) for st in result["summary"].values() for v in st.values()
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
