"""Where a training step's time and memory go: ``torch.profiler`` over one step of a ``masked_dpo.py`` configuration.

Each configuration runs in its own subprocess (its own peak RSS), profiles one step after two warm-up steps and
records the operators with the most self CPU time, the memory they allocate, and the step's wall time. Writes
``benchmarks/results/profile_masked_dpo[_size].json`` and prints a table per configuration.

    python -m benchmarks.profile_masked_dpo --size quick                 # smoke run, seconds
    python -m benchmarks.profile_masked_dpo masked_row0.1 trl_lora_r8    # the default (~60M) model
    python -m benchmarks.profile_masked_dpo --allocator retain masked_row0.1 trl_lora_r8   # malloc keeps freed memory
    python -m benchmarks.profile_masked_dpo --model ~/.cache/huggingface/hf_align/SmolLM2-135M-Instruct --dtype float32

``--model PATH`` / ``--dtype`` / ``--mask_source`` as in ``masked_dpo.py`` (shared through ``benchmarks/common.py``):
a transformers folder in each dtype, with masks from its accumulated gradients by default; it writes
``profile_real_model[_dtype][...].json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import RESULTS_DIR, module_command
from benchmarks.common import (
    add_model_arguments,
    check_model_arguments,
    load_record,
    mask_source,
    model_dtypes,
    model_record,
    run_child,
    run_record,
)
from benchmarks.masked_dpo import ALLOCATORS, SIZES, allocator_env, default_configs, make_trainer, masks_for


TOP = 15


def profile_one(
    name: str,
    size: str,
    precompute: bool,
    model_path: str | None = None,
    dtype: str | None = None,
    masks: str | None = None,
) -> dict:
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

    trainer, _, _ = make_trainer(
        name, size, precompute, 2, [ProfileThirdStep()], model_path=model_path, dtype=dtype, masks=masks
    )
    trainer.train()
    import resource

    result.update(
        config=name,
        reference="precomputed" if precompute else "live",
        dtype=dtype or "float32 + bf16 autocast",
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        threads=torch.get_num_threads(),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="configurations (default: masked_dpo.py's for the model)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="model size (default: full)")
    parser.add_argument("--precompute", action="store_true", help="precomputed reference log-probs")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="glibc", help="host allocator (see masked_dpo.py)")
    add_model_arguments(parser)
    parser.add_argument("--output", help="JSON file (default: benchmarks/results/profile_<model>[...].json)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_model_arguments(parser, args)
    size = "model" if args.model else args.size
    if args.single:
        row = profile_one(args.single, size, args.precompute, args.model, args.dtype, args.masks)
        print(json.dumps(row))
        return
    load_before = load_record()
    source = mask_source(args, args.model)
    masks, mask_record = masks_for(source, size, args.model, None, args.warmup_steps)
    results = []
    dtypes = model_dtypes(args)
    for dtype in dtypes:
        for name in args.configs or default_configs(args.model, source):
            command = module_command("profile_masked_dpo", "--single", name, "--size", args.size)
            command += ["--precompute"] if args.precompute else []
            command += ["--model", args.model, "--dtype", dtype] if args.model else []
            command += ["--masks", masks] if masks else []
            row = run_child(command, allocator_env(args.allocator))
            if "error" in row:
                print(f"{name}: failed: {row['error']}")
                continue
            row["allocator"] = args.allocator
            results.append(row)
            print(
                f"\n{name} ({row['reference']} reference, {row['dtype']}): {row['self_cpu_total_ms']:.0f} ms self CPU"
            )
            for op in row["top_ops"]:
                print(
                    f"  {op['op'][:44]:44} {op['calls']:6d} calls {op['self_cpu_ms']:9.1f} ms "
                    f"{100 * op['share']:5.1f} % {op['self_cpu_memory_mb']:9.1f} MB"
                )
    from hf_align.io import write_json

    if args.model:
        name = "profile_real_model" + ("" if len(dtypes) > 1 else f"_{dtypes[0]}")
        record = {"size": size, "model": model_record(args.model), "dtypes": list(dtypes)}
    else:
        name = "profile_masked_dpo" + ("" if args.size == "full" else f"_{args.size}")
        record = {"size": size, "spec": SIZES[size]}
    name += ("_precomputed" if args.precompute else "") + ("_retain" if args.allocator == "retain" else "")
    out = Path(args.output) if args.output else RESULTS_DIR / f"{name}.json"
    record.update(run_record(load_before), masks=mask_record, results=results)
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
