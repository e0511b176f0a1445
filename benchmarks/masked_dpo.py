"""Step time and memory: TRL DPO (full), ALLO's masked AdamW, MaskedDPOTrainer (ratio 1.0 / 0.1, row / element), LoRA.

Each configuration runs in its own subprocess (so peak RSS is its own), on the same random-init Llama, data and batch,
with a live reference and with precomputed reference log-probs. Prints a table and writes
``benchmarks/results/masked_dpo[_quick].json`` with ratios against the baselines measured in the same run.

    python benchmarks/masked_dpo.py --quick      # tiny model, a few seconds per configuration (smoke run only)
    python benchmarks/masked_dpo.py --size medium # ~6M-param Llama, a few minutes in all
    python benchmarks/masked_dpo.py              # ~60M-param Llama, batch 4 x ~192 tokens
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "trl_full",
    "allo_masked_adamw",
    "masked_ratio1.0",
    "masked_row0.1",
    "masked_element0.1",
    "trl_lora_r8",
]
SIZES = {
    "quick": dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2, digits=40),
    "medium": dict(hidden_size=384, num_layers=4, intermediate_size=1024, num_heads=6, num_kv_heads=2, digits=60),
    "full": dict(hidden_size=768, num_layers=8, intermediate_size=2048, num_heads=12, num_kv_heads=4, digits=95),
}


def _dataset(n: int, digits: int, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        number = "".join(rng.choice("0123456789") for _ in range(digits))
        wrong = "".join(rng.choice("0123456789") for _ in range(digits))
        rows.append({"prompt": f"rev {number}=", "chosen": number[::-1], "rejected": wrong})
    return Dataset.from_list(rows)


def _bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_one(name: str, size: str, precompute: bool, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from hf_align import testbed
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = dict(SIZES[size])
    digits = spec.pop("digits")
    tokenizer = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", **spec)
    model.config.max_position_embeddings = 512
    model.train()
    batch = 4
    data = _dataset(batch * (steps + 2), digits)
    tmp = tempfile.mkdtemp()
    common = dict(
        output_dir=tmp,
        per_device_train_batch_size=batch,
        max_steps=steps + 2,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=1000,
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=False,
        seed=0,
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    ref = None if precompute else copy.deepcopy(model)
    kwargs = dict(train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
    if name in ("trl_full", "trl_lora_r8", "allo_masked_adamw"):
        peft_config = None
        optimizers = (None, None)
        if name == "trl_lora_r8":
            from peft import LoraConfig

            peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
            ref = None
        if name == "allo_masked_adamw":
            from hf_align.masks import NeuronMask
            from hf_align.sparse_update import MaskedAdamW

            mask = NeuronMask.random(model, 0.1, "element", seed=0)
            groups = [{"params": [p], "mask": mask.masks[n]} for n, p in model.named_parameters() if n in mask.masks]
            optimizers = (MaskedAdamW(groups, lr=1e-5), None)
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=DPOConfig(**common),
            peft_config=peft_config,
            optimizers=optimizers,
            **kwargs,
        )
    else:
        from hf_align.masks import NeuronMask

        if name == "masked_ratio1.0":
            mask = NeuronMask.full(model, "element")
        else:
            granularity = "row" if "row" in name else "element"
            mask = NeuronMask.random(model, 0.1, granularity, seed=0)
        trainer = MaskedDPOTrainer(model=model, args=MaskedDPOConfig(**common), neuron_mask=mask, **kwargs)
    trainer.train()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    # ALLO's masks are stored next to the optimizer (bf16 per element in the original; bool here)
    extra = [g["mask"] for g in trainer.optimizer.param_groups if "mask" in g]
    return {
        "config": name,
        "reference": "precomputed" if precompute else "live",
        "step_time_s": statistics.median(times[2:]) if len(times) > 2 else statistics.median(times),
        "trainable_bytes": _bytes_of(trainable),
        "optimizer_state_bytes": _bytes_of(state) + _bytes_of(extra),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".delta")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke run (same as --size quick)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default: full)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or ("quick" if args.quick else "full")
    steps = args.steps or (3 if size == "quick" else 5)
    if args.single:
        print(json.dumps(run_one(args.single, size, args.precompute, steps)))
        return
    results = []
    load_before = os.getloadavg()
    for precompute in (False, True):
        for name in CONFIGS:
            command = [sys.executable, __file__, "--single", name, "--steps", str(steps), "--size", size]
            command += ["--precompute"] if precompute else []
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
                results.append({"config": name, "reference": "precomputed" if precompute else "live", "error": reason})
            else:
                results.append(json.loads(lines[-1]))
            print(results[-1], flush=True)
    for row in results:
        base = {r["config"]: r for r in results if r["reference"] == row["reference"] and "error" not in r}
        if "error" in row:
            continue
        for anchor in ("trl_full", "trl_lora_r8"):
            if anchor in base:
                row[f"step_time_vs_{anchor}"] = row["step_time_s"] / base[anchor]["step_time_s"]
        if "trl_full" in base:
            full = base["trl_full"]
            row["train_opt_bytes_vs_trl_full"] = (row["trainable_bytes"] + row["optimizer_state_bytes"]) / (
                full["trainable_bytes"] + full["optimizer_state_bytes"]
            )
    header = f"{'config':22} {'ref':12} {'s/step':>8} {'xfull':>6} {'xlora':>6} {'train+opt MB':>12} {'xfull':>6} {'RSS MB':>8}"
    print(header)
    for r in results:
        if "error" in r:
            print(f"{r['config']:22} {r['reference']:12} ERROR {r['error']}")
            continue
        mb = (r["trainable_bytes"] + r["optimizer_state_bytes"]) / 2**20
        print(
            f"{r['config']:22} {r['reference']:12} {r['step_time_s']:8.3f} {r.get('step_time_vs_trl_full', 0):6.2f} "
            f"{r.get('step_time_vs_trl_lora_r8', 0):6.2f} {mb:12.2f} {r.get('train_opt_bytes_vs_trl_full', 0):6.3f} "
            f"{r['peak_rss_mb']:8.0f}"
        )
    sys.path.insert(0, str(ROOT))
    from hf_align.io import write_json

    out = ROOT / "benchmarks" / "results" / f"masked_dpo{'' if size == 'full' else '_' + size}.json"
    load = {"before": list(load_before), "after": list(os.getloadavg()), "cpus": os.cpu_count()}
    print(f"load average before/after: {load['before']} / {load['after']} on {load['cpus']} CPUs")
    if max(load["before"][0], load["after"][0]) > (os.cpu_count() or 1):
        print("WARNING: the machine was busy with other work; step times are not comparable.")
    write_json(
        out, {"size": size, "spec": SIZES[size], "batch": 4, "steps": steps, "load_average": load, "results": results}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
