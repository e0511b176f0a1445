"""Scaling curve: full DPO, LoRA r=8 and masked DPO (row / element 10 %) at three model sizes, same tokens per step.

Runs ``benchmarks/masked_dpo.py``'s configurations (each in its own subprocess, ``--repeats`` interleaved runs, the
median reported) on the ~6M ("medium"), ~50M ("full") and ~190M ("large") Llama with the same data (95-digit
answers) and batch, with a live reference, under the host allocators of ``masked_dpo.py`` (``--allocator``). Writes
``benchmarks/results/scaling.json`` and ``scaling.png`` (step time, step time relative to LoRA, peak RSS and
trainable + optimizer bytes against the parameter count; solid lines glibc's defaults, dashed the retaining malloc).

    python -m benchmarks.scaling                 # 3 repeats, 2 threads, both allocators
    BENCH_THREADS=1 python -m benchmarks.scaling --repeats 2 --steps 2   # the committed results
    python -m benchmarks.scaling --sizes medium --repeats 1 --steps 1 --allocator glibc   # a smoke run
    python -m benchmarks.scaling --model ~/.cache/huggingface/hf_align/SmolLM2-135M-Instruct --allocator glibc

``--model PATH`` adds a transformers folder (e.g. ``make real-model``'s SmolLM2-135M-Instruct) to the curve, at the
same batch and answers, in each ``--dtype`` (drawn as points, not joined to the random-init sizes' lines), with masks
from its accumulated gradients unless ``--mask_source random`` (the options of ``masked_dpo.py``, shared through
``benchmarks/common.py``); ``--sizes`` with no size runs the folder alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import RESULTS_DIR
from benchmarks.common import (
    add_model_arguments,
    check_model_arguments,
    load_record,
    mask_source,
    model_dtypes,
    model_record,
    run_record,
)
from benchmarks.masked_dpo import ALLOCATORS, SIZES, masks_for, measure


CONFIGS = ["trl_full", "trl_lora_r8", "masked_row0.1", "masked_element0.1"]
LABELS = {
    "trl_full": "full DPO (TRL)",
    "trl_lora_r8": "LoRA r=8 q,v (TRL+PEFT)",
    "masked_row0.1": "masked rows 10 %",
    "masked_element0.1": "masked entries 10 %",
}
DIGITS = 95  # the default benchmark's answers: the same tokens per step at every size
BATCH = 4  # pairs per step, at every size and for a model folder
MARKERS = {"bfloat16": "*", "float32": "s"}  # a model folder's points, per dtype


def plot(results: list[dict], path: Path, threads: str, configs=CONFIGS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [
        ("step_time_s", "step time (s, median)", False),
        ("step_time_vs_trl_lora_r8", "step time / LoRA r=8's", False),
        ("peak_rss_mb", "peak RSS (MB)", False),
        ("train_opt_mb", "trainable + optimizer state (MB)", True),
    ]
    allocators = sorted({r.get("allocator", "glibc") for r in results})
    colors = {config: f"C{i}" for i, config in enumerate(configs)}
    good = [r for r in results if "error" not in r]
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for config, allocator in ((c, a) for a in allocators for c in configs):
            ours = [r for r in good if (r["config"], r.get("allocator", "glibc")) == (config, allocator) and key in r]
            for r in (r for r in ours if r.get("size") == "model"):  # a model folder: one point per dtype
                ax.plot(r["num_params"] / 1e6, r[key], MARKERS.get(r["dtype"], "o"), color=colors[config], ms=9)
            rows = sorted((r for r in ours if r.get("size") != "model"), key=lambda r: r["num_params"])
            xs = [r["num_params"] / 1e6 for r in rows]
            ys = [r[key] for r in rows]
            lo = [min(r.get(f"{key}_repeats", [r[key]])) for r in rows]
            hi = [max(r.get(f"{key}_repeats", [r[key]])) for r in rows]
            ax.errorbar(
                xs,
                ys,
                yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                marker="o",
                capsize=3,
                color=colors[config],
                linestyle="--" if allocator == "retain" else "-",
                label=f"{LABELS.get(config, config)} ({allocator})",
            )
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"DPO step on CPU, {threads} thread(s), batch {BATCH} pairs, same tokens per step (bars: min-max over "
        "repeats; model folder: * bf16, square fp32)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=CONFIGS, help=f"configurations (default: {CONFIGS})")
    parser.add_argument("--sizes", nargs="*", default=["medium", "full", "large"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration and size (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after two warm-up steps)")
    parser.add_argument("--allocator", choices=(*ALLOCATORS, "both"), default="both", help="see masked_dpo.py")
    parser.add_argument("--output", default=str(RESULTS_DIR / "scaling.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the existing JSON")
    add_model_arguments(parser)
    args = parser.parse_args()
    check_model_arguments(parser, args)
    out = Path(args.output)
    if args.plot_only:
        record = json.loads(out.read_text())
        configs = record.get("configs", CONFIGS)
        plot(record["results"], out.with_suffix(".png"), record["load_average"]["before"]["threads"], configs)
        return
    if not args.sizes and not args.model:
        parser.error("--sizes: expected at least one size, or a model folder (--model)")
    load_before = load_record()
    results, masks = [], {}
    allocators = ALLOCATORS if args.allocator == "both" else (args.allocator,)
    points = [(size, None) for size in args.sizes] + ([("model", args.model)] if args.model else [])
    for size, path in points:
        folder, masks[size] = masks_for(mask_source(args, path), size, path, DIGITS, args.warmup_steps, BATCH)
        dtypes = model_dtypes(args) if path else (None,)
        rows = measure(
            args.configs, size, args.steps, args.repeats, (False,), DIGITS, allocators, path, dtypes, folder, BATCH
        )
        for row in rows:
            row["size"] = size
            if "error" not in row:
                row["train_opt_mb"] = (row["trainable_bytes"] + row["optimizer_state_bytes"]) / 2**20
        results += rows
    from hf_align.io import write_json

    print(
        f"{'size':8} {'dtype':8} {'config':20} {'alloc':7} {'params M':>9} {'s/step':>8} {'xLoRA':>6} {'RSS MB':>8} "
        f"{'train+opt MB':>12}"
    )
    for r in results:
        dtype = str(r.get("dtype"))[:8]
        if "error" in r:
            print(f"{r['size']:8} {dtype:8} {r['config']:20} {r['allocator']:7} ERROR {r['error']}")
            continue
        print(
            f"{r['size']:8} {dtype:8} {r['config']:20} {r['allocator']:7} {r['num_params'] / 1e6:9.1f} "
            f"{r['step_time_s']:8.3f} "
            f"{r.get('step_time_vs_trl_lora_r8', 0):6.2f} {r['peak_rss_mb']:8.0f} {r['train_opt_mb']:12.1f}"
        )
    record = {
        "sizes": {s: SIZES[s] for s in args.sizes},
        "model": model_record(args.model) if args.model else None,
        "configs": args.configs,
        "digits": DIGITS,
        "batch": BATCH,
        "steps": args.steps,
        "repeats": args.repeats,
        "allocators": list(allocators),
        **run_record(load_before),
        "masks": masks,
        "results": results,
    }
    write_json(out, record)
    plot(results, out.with_suffix(".png"), load_before["threads"], args.configs)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
