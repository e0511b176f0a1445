"""Overhead of MaskAccumulationCallback on a TRL DPO step (target: ≤ 1.05× the step time without it).

Model: a randomly initialised ~50M-parameter Llama with the testbed vocabulary (``--quick``: the tiny one);
data: the testbed preference set. Two measurements:

* the median DPO optimizer step without the callback (``--steps`` measured after 1 warm-up step), and
* the callback's per-step work in isolation: ``on_pre_optimizer_step`` on the same model with every gradient
  filled (median of ``--hook-repeats`` calls); for ``weight_diff`` the cost of one save (scoring |Δθ|).

ratio = (step + hook) / step. Timing the hook in isolation is what makes the number meaningful on a
shared, noisy CPU; ``--ab`` additionally trains each configuration with the callback in the loop and
reports the direct A/B ratio (noisy; the default for ``--quick``).

    python -m benchmarks.mask_accumulation [--quick] [--steps 2] [--ab]

Prints a table and writes ``benchmarks/results/mask_accumulation.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

from benchmarks import RESULTS_DIR


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_align import testbed  # noqa: E402
from hf_align.callbacks import MaskAccumulationCallback  # noqa: E402
from hf_align.io import write_json  # noqa: E402
from hf_align.testbed import quiet_training_args


RESULTS = RESULTS_DIR / "mask_accumulation.json"
# The MaskedDPO benchmark's model and data (benchmarks/masked_dpo.py "full"): ~50M params, pairs of ~2 x 95 digits.
FULL = dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, intermediate_size=2048)
FULL_DIGITS, FULL_MAX_LENGTH = 95, 256
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
    model, tokenizer, dataset, callback_kwargs, steps: int, warmup: int, output_dir: str, max_length: int = 48
) -> tuple[float, float]:
    """(median step seconds, median seconds spent in the callback's per-step hook)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **quiet_training_args(
            bf16=True,  # TRL's default, kept: the committed numbers were measured with bf16 autocast
            output_dir=output_dir,
            per_device_train_batch_size=4,
            max_steps=warmup + steps,
            learning_rate=1e-5,
            max_grad_norm=1.0,
            logging_strategy="no",
            log_level="error",
            use_cpu=not torch.cuda.is_available(),
            max_length=max_length,
            gradient_checkpointing=False,
            seed=0,
        )
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


class _State:
    global_step = 0
    is_world_process_zero = True


def hook_seconds(model, callback_kwargs: dict, repeats: int, output_dir: str) -> tuple[float, float]:
    """(median seconds of the per-step hook, seconds of one save) for a callback on ``model`` with full grads."""
    from transformers import TrainingArguments

    args = TrainingArguments(**quiet_training_args(output_dir=output_dir, use_cpu=not torch.cuda.is_available()))
    callback = MaskAccumulationCallback(**callback_kwargs)
    callback.on_train_begin(args, _State(), None, model=model)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        callback.on_pre_optimizer_step(args, _State(), None, model=model)
        _sync()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    callback.scores(model)
    save = time.perf_counter() - start
    args.max_grad_norm = callback._max_grad_norm or args.max_grad_norm
    model.zero_grad(set_to_none=True)
    return statistics.median(times), save


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny model: a smoke run (with --ab).")
    parser.add_argument("--steps", type=int, default=2, help="Measured DPO optimizer steps (after 1 warm-up step).")
    parser.add_argument("--hook-repeats", type=int, default=5, help="Timed calls of the callback's per-step hook.")
    parser.add_argument("--ab", action="store_true", help="Also train every configuration with the callback (noisy).")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    steps, ab = (3, True) if args.quick else (args.steps, args.ab)
    sizes = QUICK if args.quick else FULL
    model = testbed.load_random_tiny("llama", **sizes)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = testbed.load_tokenizer()
    if args.quick:
        dataset, max_length = testbed.preference_dataset(64, seed=0), 48
    else:
        from benchmarks.masked_dpo import _dataset

        dataset, max_length = _dataset(64, FULL_DIGITS), FULL_MAX_LENGTH
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = run_one(model, tokenizer, dataset, None, steps, 1, f"{tmp}/baseline", max_length)
        for name in args.configs:
            if CONFIGS[name] is None:
                continue
            hook, save = hook_seconds(model, CONFIGS[name], args.hook_repeats, f"{tmp}/hook-{name.replace('/', '_')}")
            row = {
                "config": name,
                "hook_s": round(hook, 5),
                "save_s": round(save, 4),
                "ratio": round((base + hook) / base, 4),
            }
            if ab:
                step, _ = run_one(
                    model, tokenizer, dataset, CONFIGS[name], steps, 1, f"{tmp}/{name.replace('/', '_')}", max_length
                )
                row["ab_step_s"], row["ab_ratio"] = round(step, 4), round(step / base, 4)
            rows.append(row)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"DPO step, Llama {params / 1e6:.1f}M params, batch 4, {device}, baseline step {base:.3f} s")
    print(f"{'config':<26} {'hook/step (s)':>14} {'save (s)':>9} {'ratio':>7} {'A/B ratio':>10}")
    for row in rows:
        print(
            f"{row['config']:<26} {row['hook_s']:>14.5f} {row['save_s']:>9.3f} {row['ratio']:>7.4f} "
            f"{row.get('ab_ratio', '-'):>10}"
        )
    result = {
        "benchmark": "mask_accumulation",
        "quick": args.quick,
        "model_params": params,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "baseline_step_s": round(base, 4),
        "measured_steps": steps,
        "target_ratio": 1.05,
        "results": rows,
    }
    write_json(RESULTS if not args.quick else RESULTS.with_name("mask_accumulation_quick.json"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
