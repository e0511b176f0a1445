"""What the fidelity sections share: disjoint prompt splits, mean ± std, the separation rule, a section's plumbing."""

from __future__ import annotations

import importlib
import statistics
from pathlib import Path

from benchmarks import RESULTS_DIR


RESULTS = RESULTS_DIR
TEST_SEED, HELDOUT_SEED = 1234, 4321
"""Prompt seeds: the report's test prompts and the held-out prompts that learning rates are chosen on."""


def section_module(name: str):
    """The section module ``benchmarks.fidelity.<name>`` (imported on first use: each is a few hundred lines)."""
    return importlib.import_module(f"benchmarks.fidelity.{name}")


def prompt_splits(test_prompts: int, heldout_prompts: int) -> tuple[list[str], list[str]]:
    """Test prompts (the report's) and held-out prompts (lr selection only), disjoint."""
    from hf_align.testbed.evaluation import eval_prompts

    test = eval_prompts(test_prompts, seed=TEST_SEED)
    seen, heldout = set(test), []
    for prompt in eval_prompts(4 * heldout_prompts, seed=HELDOUT_SEED):
        if prompt not in seen and len(heldout) < heldout_prompts:
            heldout.append(prompt)
            seen.add(prompt)
    return test, heldout


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(v: tuple[float, float], digits: int = 3, n: int = 2) -> str:
    """``mean ± std`` (the mean alone for a single seed)."""
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if n > 1 else f"{v[0]:.{digits}f}"


def best_lr(sweep: dict[str, float]) -> str:
    """The lr with the highest held-out reward (a diverged run scores NaN and is never chosen)."""
    import math

    finite = {lr: r for lr, r in sweep.items() if math.isfinite(r)} or sweep
    return max(finite, key=lambda lr: finite[lr])


def below(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a below b by more than a's and b's stds together (a weak test with few seeds; the reports say so)."""
    return a[0] + a[1] < b[0] - b[1]


def verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    """A claim "a > b": *shown* when separated that way, *shown not to hold* when separated the other way."""
    if below(b, a):
        return "shown"
    if below(a, b):
        return "shown not to hold"
    return "not shown"


def encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """(prompt + completion + EOS ids, prompt length): the prompt-completion format, loss on the completion."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, len(p)


def collate(rows: list[tuple[list[int], int]], pad: int):
    """Right-padded (input_ids, attention_mask, labels), labels −100 on the prompt and the padding."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (seq, plen) in enumerate(rows):
        ids[b, : len(seq)] = torch.tensor(seq)
        labels[b, plen : len(seq)] = torch.tensor(seq[plen:])
        attn[b, : len(seq)] = 1
    return ids, attn, labels


def token_logps(model, ids, attn, labels):
    """Per-token log-probabilities of the labels (shifted), zero off the completion, and the completion mask (float)."""
    import torch

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = (target != -100).float()
    logps = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


# ------------------------------------------------------------------------------------- a section's plumbing
def section_paths(name: str, quick: bool, results: Path) -> tuple[Path, str]:
    """A section's JSON path and its plot's file name (``fidelity_<name>[_quick].json``, ``fidelity[_quick]_<name>.png``)."""
    suffix = "_quick" if quick else ""
    return results / f"fidelity_{name}{suffix}.json", f"fidelity{suffix}_{name}.png"


def run_section(module, name: str, quick: bool, results: Path, seeds: list[int] | None = None, log=print) -> dict:
    """Run a section module (its ``settings``/``run``/``refresh``/``plot``); write its JSON and plot under ``results``."""
    from hf_align import testbed
    from hf_align.io import write_json

    cfg = module.settings(quick)
    if seeds:
        cfg["seeds"] = list(seeds)
    result = module.refresh(module.run(testbed.load(), cfg, log=log))
    path, result["plot"] = section_paths(name, quick, results)
    module.plot(result, results / result["plot"])
    write_json(path, result)
    return result


def rewrite_section(module, name: str, quick: bool, results: Path) -> dict:
    """Summary, findings and plot rebuilt from a section's JSON (after a change to the report code, no rerun)."""
    from hf_align.io import read_json, write_json

    path, _ = section_paths(name, quick, results)
    result = module.refresh(read_json(path))
    module.plot(result, results / result["plot"])
    write_json(path, result)
    return result


def section_main(module, name: str, argv: list[str] | None, finite) -> int:
    """The command line every section script shares; exit 1 when ``finite(result)`` is false (a diverged run)."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(
        prog=f"python -m {module.__spec__.name}", description=module.__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, fewer lrs, a few steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (the first sweeps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rewrite", action="store_true", help="only rebuild summary, findings and plot from the JSON")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and the plot go")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rewrite:
        result = rewrite_section(module, name, args.quick, args.results)
    else:
        result = run_section(module, name, args.quick, args.results, seeds=args.seeds)
    print("\n".join(module.markdown(result)))
    print(f"section done in {result['wall_s'] / 60:.1f} min; merge it into fidelity.md with "
          f"`python -m benchmarks.fidelity --rewrite{' --quick' if args.quick else ''}`")  # fmt: skip
    return 0 if finite(result) else 1
