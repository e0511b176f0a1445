"""Where a training step's time and memory go: ``torch.profiler`` over one step of a ``masked_dpo.py`` configuration.

Each configuration runs in its own subprocess (its own peak RSS), profiles one step after two warm-up steps and
records the operators with the most self CPU time, the memory they allocate, and the step's wall time. Writes
``benchmarks/results/profile_masked_dpo[_size].json`` and prints a table per configuration.

    python -m benchmarks.profile_masked_dpo --size quick                 # smoke run, seconds
    python -m benchmarks.profile_masked_dpo masked_row0.1 trl_lora_r8    # the default (~60M) model
    python -m benchmarks.profile_masked_dpo --allocator retain masked_row0.1 trl_lora_r8   # malloc keeps freed memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

from benchmarks import RESULTS_DIR, ROOT, module_command
from benchmarks.masked_dpo import ALLOCATORS, CONFIGS, SIZES, allocator_env, make_trainer


TOP = 15


def profile_one(name: str, size: str, precompute: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    result: dict = {}

    class ProfileThirdStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                total = sum(e.self_cpu_time_total for e in events)
                rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
                result["self_cpu_total_ms"] = total / 1e3
                result["top_ops"] = [
                    {
                        "op": e.key,
                        "calls": e.count,
                        "self_cpu_ms": e.self_cpu_time_total / 1e3,
                        "share": e.self_cpu_time_total / max(total, 1),
                        "self_cpu_memory_mb": e.self_cpu_memory_usage / 2**20,
                    }
                    for e in rows
                ]

    trainer, _ = make_trainer(name, size, precompute, steps=2, callbacks=[ProfileThirdStep()])
    trainer.train()
    import resource

    result.update(
        config=name,
        reference="precomputed" if precompute else "live",
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        threads=torch.get_num_threads(),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=CONFIGS, help=f"configurations (default: all of {CONFIGS})")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="model size (default: full)")
    parser.add_argument("--precompute", action="store_true", help="precomputed reference log-probs")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="glibc", help="host allocator (see masked_dpo.py)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(profile_one(args.single, args.size, args.precompute)))
        return
    results = []
    load_before = os.getloadavg()
    for name in args.configs:
        command = module_command("profile_masked_dpo", "--single", name, "--size", args.size)
        command += ["--precompute"] if args.precompute else []
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=allocator_env(args.allocator))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        row = json.loads(lines[-1])
        row["allocator"] = args.allocator
        results.append(row)
        print(f"\n{name} ({row['reference']} reference): {row['self_cpu_total_ms']:.0f} ms self CPU in one step")
        for op in row["top_ops"]:
            print(
                f"  {op['op'][:44]:44} {op['calls']:6d} calls {op['self_cpu_ms']:9.1f} ms {100 * op['share']:5.1f} % "
                f"{op['self_cpu_memory_mb']:9.1f} MB"
            )
    from hf_align.io import write_json

    load = {"before": list(load_before), "after": list(os.getloadavg()), "cpus": os.cpu_count()}
    suffix = "" if args.size == "full" else f"_{args.size}"
    suffix += "_precomputed" if args.precompute else ""
    suffix += "_retain" if args.allocator == "retain" else ""
    out = RESULTS_DIR / f"profile_masked_dpo{suffix}.json"
    write_json(out, {"size": args.size, "spec": SIZES[args.size], "load_average": load, "results": results})
    print(f"load average before/after: {load['before']} / {load['after']}; wrote {out}")


if __name__ == "__main__":
    main()
