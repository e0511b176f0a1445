"""ALT / Quark benchmark: time split of one online iteration, and DataPool operations up to 100k rows.

    python -m benchmarks.feedback [--quick]

Prints two tables and writes ``benchmarks/results/feedback.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks import RESULTS_DIR
from hf_align.data_pool import DataPool
from hf_align.io import write_json
from hf_align.testbed import quiet_training_args


RESULTS = RESULTS_DIR / "feedback.json"


def iteration_split(quick: bool) -> dict:
    """One full iteration (sampling / feedback / pool / training) of the quantile loop on the testbed."""
    from hf_align import testbed
    from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer

    tb = testbed.load()
    steps = 10 if quick else 50
    with tempfile.TemporaryDirectory() as tmp:
        config = FeedbackConditionedConfig(
            **quiet_training_args(
                output_dir=tmp,
                num_rounds=2,
                steps_per_round=steps,
                prompts_per_round=64 if quick else 256,
                num_generations=4,
                max_completion_length=6,
                per_device_train_batch_size=16,
                learning_rate=1e-3,
                beta=0.05,
                balance_lengths=True,
                feedback_template="{feedback}{prompt}",
                logging_steps=1000,
            )
        )
        trainer = FeedbackConditionedTrainer(
            tb.model, config, tb.prompt_dataset(256), processing_class=tb.tokenizer, reward_funcs=testbed.reward
        )
        trainer.train()
    rows = []
    for t in trainer.iteration_timings:
        parts = {k: t.get(k, 0.0) for k in ("sampling_s", "feedback_s", "pool_add_s", "pool_sample_s", "training_s")}
        total = sum(parts.values())
        rows.append({**{k: t[k] for k in ("iteration", "pool_size", "mean_score")}, **parts, "total_s": total})
    return {"steps_per_round": steps, "prompts_per_round": config.prompts_per_round, "iterations": rows}


def pool_scaling(sizes: list[int], add_batch: int = 1000) -> list[dict]:
    """Time add / re-bin / balanced+length-balanced draw / save+load as the pool grows."""
    rng = np.random.default_rng(0)
    pool = DataPool(num_quantiles=5, max_per_prompt=64, seed=0)
    out = []
    target_index = 0
    while target_index < len(sizes):
        n = add_batch
        t0 = time.perf_counter()
        pool.add(
            [f"prompt {i}" for i in rng.integers(0, 20_000, n)],
            ["completion"] * n,
            scores=rng.random(n),
            iteration=len(pool) // add_batch,
            lengths=rng.integers(1, 64, n),
        )
        add_s = time.perf_counter() - t0
        if len(pool) >= sizes[target_index]:
            t0 = time.perf_counter()
            pool.bins()
            bins_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool.sample(4096, balance_lengths=True, rng=np.random.default_rng(1))
            sample_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                pool.save(tmp)
                DataPool.load(tmp)
                save_load_s = time.perf_counter() - t0
            out.append(
                {
                    "pool_size": len(pool),
                    "add_1000_s": add_s,
                    "rebin_s": bins_s,
                    "draw_4096_length_balanced_s": sample_s,
                    "save_load_s": save_load_s,
                }
            )
            target_index += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small iteration, pool up to 20k rows")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    split = iteration_split(args.quick)
    print(f"\nOne iteration ({split['prompts_per_round']} prompts x 4, {split['steps_per_round']} steps)")
    header = [
        "iteration",
        "pool_size",
        "sampling_s",
        "feedback_s",
        "pool_add_s",
        "pool_sample_s",
        "training_s",
        "total_s",
    ]
    print(" | ".join(f"{h:>13}" for h in header))
    for row in split["iterations"]:
        print(" | ".join(f"{row[h]:>13.3f}" if isinstance(row[h], float) else f"{row[h]:>13}" for h in header))

    sizes = [1_000, 5_000, 20_000] if args.quick else [1_000, 10_000, 50_000, 100_000]
    scaling = pool_scaling(sizes)
    print("\nDataPool operations vs pool size (seconds)")
    cols = ["pool_size", "add_1000_s", "rebin_s", "draw_4096_length_balanced_s", "save_load_s"]
    print(" | ".join(f"{c:>27}" for c in cols))
    for row in scaling:
        print(" | ".join(f"{row[c]:>27.4f}" if isinstance(row[c], float) else f"{row[c]:>27}" for c in cols))

    write_json(RESULTS, {"quick": args.quick, "iteration_split": split, "pool_scaling": scaling})
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
