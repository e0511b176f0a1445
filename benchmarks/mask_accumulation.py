"""Overhead of MaskAccumulationCallback on a TRL DPO step (target: ≤ 1.05× the step time without it).

Model: a randomly initialised ~50M-parameter Llama with the testbed vocabulary (``--quick``: the tiny one);
data: the testbed preference set. Each configuration trains a few warm-up steps, then the median of the
measured optimizer steps is taken; configurations alternate over ``--rounds`` rounds and the best round
counts, to damp the noise of a shared machine.

    python benchmarks/mask_accumulation.py [--quick] [--steps 4] [--rounds 1]

Prints a table and writes ``benchmarks/results/mask_accumulation.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_align import testbed  # noqa: E402
from hf_align.callbacks import MaskAccumulationCallback  # noqa: E402
from hf_align.io import write_json  # noqa: E402


RESULTS = Path(__file__).resolve().parent / "results" / "mask_accumulation.json"
FULL = dict(hidden_size=640, num_layers=10, num_heads=10, num_kv_heads=5, intermediate_size=1728)
QUICK = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128)
CONFIGS = {
    "baseline": None,
    "gradient/row/pre_clip": dict(method="gradient", granularity="row", grad_stage="pre_clip"),
    "gradient/row/post_clip": dict(method="gradient", granularity="row", grad_stage="post_clip"),
    "gradient/element/bf16": dict(method="gradient", granularity="element", score_dtype="bfloat16"),
    "weight_diff/element": dict(method="weight_diff", granularity="element"),
}


class TimedMaskAccumulation(MaskAccumulationCallback):
    """Times the callback's per-step work directly: robust to the noise of a shared machine."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hook_times: list[float] = []

    def on_pre_optimizer_step(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_pre_optimizer_step(*args, **kwargs)
        self.hook_times.append(time.perf_counter() - start)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run_one(
    model, tokenizer, dataset, callback_kwargs, steps: int, warmup: int, output_dir: str
) -> tuple[float, float]:
    """(median step seconds, median seconds spent in the callback's per-step hook)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        max_steps=warmup + steps,
        learning_rate=1e-5,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        log_level="error",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=48,
        seed=0,
    )
    timer = StepTimer()
    mask_callback = TimedMaskAccumulation(**callback_kwargs) if callback_kwargs else None
    callbacks = [timer] + ([mask_callback] if mask_callback else [])
    trainer = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    hook = statistics.median(mask_callback.hook_times[warmup:]) if mask_callback and mask_callback.hook_times else 0.0
    return statistics.median(timer.times[warmup:]), hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny model, 3 steps: a smoke run.")
    parser.add_argument("--steps", type=int, default=4, help="Measured optimizer steps per configuration.")
    parser.add_argument("--rounds", type=int, default=1, help="Alternating rounds; the best round counts.")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    sizes = QUICK if args.quick else FULL
    model = testbed.load_random_tiny("llama", **sizes)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = testbed.load_tokenizer()
    dataset = testbed.preference_dataset(64, seed=0)
    params = sum(p.numel() for p in model.parameters())
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for name in args.configs:
                out = f"{tmp}/{round_}-{name.replace('/', '_')}"
                step, hook = run_one(model, tokenizer, dataset, CONFIGS[name], steps, 2, out)
                if name not in best or step < best[name][0]:
                    best[name] = (step, hook)
    base = best.get("baseline", (None, 0.0))[0]
    rows = [
        {
            "config": name,
            "median_step_s": round(step, 4),
            "ratio_vs_baseline": round(step / base, 4) if base else None,
            "median_hook_s": round(hook, 5),
            "ratio_from_hook_time": round(step / (step - hook), 4) if step > hook else None,
        }
        for name, (step, hook) in best.items()
    ]
    print(
        f"DPO step, Llama {params / 1e6:.1f}M params, batch 4, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(f"{'config':<26} {'median step (s)':>16} {'× baseline':>11} {'hook (s)':>10} {'× (hook time)':>14}")
    for row in rows:
        print(
            f"{row['config']:<26} {row['median_step_s']:>16.4f} {row['ratio_vs_baseline'] or '-':>11} "
            f"{row['median_hook_s']:>10.5f} {row['ratio_from_hook_time'] or '-':>14}"
        )
    result = {
        "benchmark": "mask_accumulation",
        "quick": args.quick,
        "model_params": params,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "measured_steps": steps,
        "rounds": rounds,
        "target_ratio": 1.05,
        "results": rows,
    }
    write_json(RESULTS if not args.quick else RESULTS.with_name("mask_accumulation_quick.json"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
