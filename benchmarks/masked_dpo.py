"""Step time and memory: TRL DPO (full), ALLO's masked AdamW, MaskedDPOTrainer (ratio 1.0 / 0.1, row / element), LoRA.

Each configuration runs in its own subprocess (so peak RSS is its own), on the same random-init Llama, data and batch,
with a live reference and with precomputed reference log-probs, under two host allocators (``--allocator``):

* ``glibc``: the C library's defaults, which give freed memory back to the OS; the next step's activations are
  fresh pages, zeroed by the kernel on first touch (the minor page faults per step are recorded);
* ``retain``: the same malloc told to keep freed memory for reuse (``MALLOC_MMAP_THRESHOLD_`` /
  ``MALLOC_TRIM_THRESHOLD_``), as jemalloc/tcmalloc (PyTorch's CPU tuning guide) and CUDA's caching allocator do.

Prints a table and writes ``benchmarks/results/masked_dpo[_size].json`` with ratios against the baselines measured
in the same run, under the same allocator.

    python -m benchmarks.masked_dpo --quick      # tiny model, a few seconds per configuration (smoke run only)
    python -m benchmarks.masked_dpo --size medium # ~6M-param Llama, a few minutes in all
    python -m benchmarks.masked_dpo              # ~60M-param Llama, batch 4 x ~192 tokens
    python -m benchmarks.masked_dpo --model ~/.cache/huggingface/hf_align/SmolLM2-135M-Instruct   # a real model

``--model PATH`` takes a transformers folder (its own tokenizer; e.g. ``make real-model``'s SmolLM2-135M-Instruct:
30 layers, tied embeddings, 49k vocabulary) instead of a random-init size, at batch 2 x ~64 tokens, with a live
reference and glibc's allocator by default, in each ``--dtype``: ``bfloat16`` (bf16 weights, TRL's bf16 autocast)
and ``float32`` (fp32 weights, no autocast). Ratios compare configurations of the same dtype.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import RESULTS_DIR, ROOT, module_command


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

CONFIGS = [
    "trl_full",
    "allo_masked_adamw",
    "masked_ratio1.0",
    "masked_row0.1",
    "masked_element0.1",
    "trl_lora_r8",
    "trl_lora_r8_all",
    "npo_token_row0.1",
]
# glibc malloc's tunables (read at start-up): every allocation from the heap, which is never trimmed
RETAIN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}
ALLOCATORS = ("glibc", "retain")
SIZES = {
    "quick": dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2, digits=40),
    "medium": dict(hidden_size=384, num_layers=4, intermediate_size=1024, num_heads=6, num_kv_heads=2, digits=60),
    "full": dict(hidden_size=768, num_layers=8, intermediate_size=2048, num_heads=12, num_kv_heads=4, digits=95),
    "large": dict(hidden_size=1024, num_layers=16, intermediate_size=2816, num_heads=16, num_kv_heads=4, digits=95),
}
MODEL_CONFIGS = [
    "trl_full",
    "trl_lora_r8",
    "masked_row0.1",
    "masked_element0.1",
    "masked_element0.1_sampled",
    "masked_element_permodule",
    "masked_element_permodule_sampled",
    "npo_token_row0.1",
]
# "_sampled": element-masked Linear layers at most this dense take the sampled weight gradient, per the dtype of
# their GEMMs (benchmarks/results/sampled_gradient.json: the sampled GEMM wins up to ~0.1 in fp32, ~0.05 in bf16)
SAMPLED_DENSITY = {"float32": 0.1, "bfloat16": 0.05}
# "permodule": an element mask with the per-module densities a top-10 % entry mask from accumulated gradients gives
# SmolLM2-135M (issue #32), random within each module; parameters not listed (embeddings, norms) at 10 %
PERMODULE_DENSITY = {"q_proj": 0.04, "k_proj": 0.10, "v_proj": 0.37, "o_proj": 0.22, "_proj": 0.08}
MODEL_BATCH = (
    2  # pairs per step on a model folder: with MODEL_DIGITS, ~64 tokens per sequence (digits: one token each)
)
MODEL_DIGITS = 30
MODEL_DTYPES = ("bfloat16", "float32")


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


def _load_model(size: str, model_path: str | None, dtype: str | None):
    """The random-init ``size`` Llama with the testbed's tokenizer, or the folder ``model_path`` (and its own
    tokenizer) in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_align import testbed

    if model_path is None:
        spec = dict(SIZES[size])
        spec.pop("digits")
        model = testbed.load_random_tiny("llama", **spec)
        model.config.max_position_embeddings = 512
        return model, testbed.load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype or "bfloat16"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _permodule_mask(model):
    """A seeded random element mask at :data:`PERMODULE_DENSITY` per module (the first key a name contains)."""
    import torch

    from hf_align.masks import NeuronMask

    generator = torch.Generator().manual_seed(0)
    masks = {}
    for name, param in model.named_parameters():
        density = next((d for key, d in PERMODULE_DENSITY.items() if key in name), 0.1)
        masks[name] = torch.rand(param.shape, generator=generator) < density
    mask = NeuronMask(masks, {"granularity": "element"})
    mask.validate(model)
    return mask


def make_trainer(
    name: str,
    size: str,
    precompute: bool,
    steps: int,
    callbacks: list,
    digits: int | None = None,
    model_path: str | None = None,
    dtype: str | None = None,
):
    """The configuration ``name`` on the ``size`` model (or the folder ``model_path`` in ``dtype``), ready to train
    ``steps + 2`` steps (shared with ``benchmarks/profile_masked_dpo.py``)."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from hf_align.testbed import quiet_training_args
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    digits = digits or (MODEL_DIGITS if model_path else SIZES[size]["digits"])
    model, tokenizer = _load_model(size, model_path, dtype)
    model.train()
    batch = MODEL_BATCH if model_path else 4
    data = _dataset(batch * (steps + 2), digits)
    tmp = tempfile.mkdtemp()
    common = quiet_training_args(
        # TRL's default, kept: the committed numbers were measured with bf16 autocast; a model folder's "float32"
        # runs without autocast
        bf16=model_path is None or dtype != "float32",
        output_dir=tmp,
        per_device_train_batch_size=batch,
        max_steps=steps + 2,
        learning_rate=1e-5,
        logging_steps=1000,
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=False,
        seed=0,
    )
    ref = None if precompute else copy.deepcopy(model)
    kwargs = dict(train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    if name in ("trl_full", "trl_lora_r8", "trl_lora_r8_all", "allo_masked_adamw"):
        peft_config = None
        optimizers = (None, None)
        if name.startswith("trl_lora_r8"):  # q,v as PEFT's default; "_all": every Linear a neuron mask covers
            from peft import LoraConfig

            targets = "all-linear" if name == "trl_lora_r8_all" else ["q_proj", "v_proj"]
            peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
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
    elif name == "npo_token_row0.1":  # NPO's forgetting stage on the same pairs: the rejected completions only
        from hf_align.masks import NeuronMask
        from hf_align.trainers import NPOConfig, NPOTrainer

        common.pop("precompute_ref_log_probs")
        forget = data.map(lambda row: {"completion": row["rejected"]}, remove_columns=["chosen", "rejected"])
        trainer = NPOTrainer(
            model=model,
            args=NPOConfig(**common, npo_level="token", precompute_ref_log_probs=precompute),
            train_dataset=forget,
            processing_class=tokenizer,
            callbacks=callbacks,
            neuron_mask=NeuronMask.random(model, 0.1, "row", seed=0),
        )
    else:
        from hf_align.masks import NeuronMask

        if name == "masked_ratio1.0":
            mask = NeuronMask.full(model, "element")
        elif name.startswith("masked_element_permodule"):
            mask = _permodule_mask(model)
        else:
            granularity = "row" if "row" in name else "element"
            mask = NeuronMask.random(model, 0.1, granularity, seed=0)
        if name.endswith("_sampled"):
            common["neuron_sampled_gradient_density"] = SAMPLED_DENSITY[
                "float32" if dtype == "float32" else "bfloat16"
            ]
        trainer = MaskedDPOTrainer(model=model, args=MaskedDPOConfig(**common), neuron_mask=mask, **kwargs)
    return trainer, model


def run_one(
    name: str,
    size: str,
    precompute: bool,
    steps: int,
    digits: int | None = None,
    model_path: str | None = None,
    dtype: str | None = None,
) -> dict:
    import torch
    from transformers import TrainerCallback

    times: list[float] = []
    cpu_times: list[float] = []
    faults: list[int] = []

    class Timer(TrainerCallback):  # wall time, the process's CPU time (less sensitive to other work), page faults
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.cpu = time.perf_counter(), time.process_time()
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            cpu_times.append(time.process_time() - self.cpu)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults)

    trainer, model = make_trainer(name, size, precompute, steps, [Timer()], digits, model_path, dtype)
    trainer.train()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    # ALLO's masks are stored next to the optimizer (bf16 per element in the original; bool here)
    extra = [g["mask"] for g in trainer.optimizer.param_groups if "mask" in g]

    def timed(values):  # the first two steps warm up
        return statistics.median(values[2:]) if len(values) > 2 else statistics.median(values)

    return {
        "config": name,
        "reference": "precomputed" if precompute else "live",
        "allocator": os.environ.get("BENCH_ALLOCATOR", "glibc"),
        "dtype": dtype or "float32 + bf16 autocast",
        "step_time_s": timed(times),
        "step_cpu_s": timed(cpu_times),
        "page_faults_per_step": timed(faults),
        "trainable_bytes": _bytes_of(trainable),
        "optimizer_state_bytes": _bytes_of(state) + _bytes_of(extra),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".delta")),
    }


def _median_of(rows: list[dict]) -> dict:
    """One configuration's repeats: the median step time and peak RSS, with every repeat's values kept."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return rows[-1]
    row = dict(good[0])
    for key in ("step_time_s", "step_cpu_s", "peak_rss_mb", "page_faults_per_step"):
        row[f"{key}_repeats"] = [r[key] for r in good]
        row[key] = statistics.median(row[f"{key}_repeats"])
    row["load_average_1min_repeats"] = [r["load_average_1min"] for r in rows]
    row.pop("load_average_1min", None)
    return row


def allocator_env(allocator: str) -> dict[str, str]:
    """The environment of a benchmark subprocess under ``allocator`` (its malloc reads the tunables at start-up)."""
    return dict(os.environ, BENCH_ALLOCATOR=allocator, **(RETAIN_ENV if allocator == "retain" else {}))


def _run_single(
    name: str,
    size: str,
    steps: int,
    precompute: bool,
    allocator: str,
    digits: int | None,
    model_path: str | None = None,
    dtype: str | None = None,
) -> dict:
    """One configuration in a fresh process (its own peak RSS; the allocator's tunables are read at start-up)."""
    command = module_command("masked_dpo", "--single", name, "--steps", str(steps))
    command += ["--size", size] if model_path is None else []
    command += ["--precompute"] if precompute else []
    command += ["--digits", str(digits)] if digits else []
    command += ["--model", model_path, "--dtype", dtype or "bfloat16"] if model_path else []
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=allocator_env(allocator))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
    reference = "precomputed" if precompute else "live"
    return {"config": name, "reference": reference, "allocator": allocator, "dtype": dtype, "error": reason}


def measure(
    names,
    size: str,
    steps: int,
    repeats: int,
    precomputes=(False, True),
    digits: int | None = None,
    allocators=("glibc",),
    model_path: str | None = None,
    dtypes=(None,),
):
    """Each configuration in its own subprocess, ``repeats`` times, interleaved (a change in the machine's load hits
    every configuration alike); the medians, with every repeat's values and the 1-minute load after each run.
    Ratios compare configurations measured with the same reference, allocator and dtype."""
    runs: dict[tuple, list[dict]] = {}
    for repeat in range(repeats):
        for allocator, dtype, precompute, name in itertools.product(allocators, dtypes, precomputes, names):
            row = _run_single(name, size, steps, precompute, allocator, digits, model_path, dtype)
            row["load_average_1min"] = os.getloadavg()[0]
            runs.setdefault((name, precompute, allocator, dtype), []).append(row)
            print(f"{size} repeat {repeat + 1}/{repeats}: {row}", flush=True)
    results = [_median_of(rows) for rows in runs.values()]
    same = ("reference", "allocator", "dtype")
    for row in results:
        base = {r["config"]: r for r in results if all(r[k] == row[k] for k in same) and "error" not in r}
        if "error" in row:
            continue
        for anchor in ("trl_full", "trl_lora_r8", "trl_lora_r8_all", "masked_row0.1"):
            if anchor in base:
                for key in ("step_time_s", "step_cpu_s"):
                    row[f"{key.removesuffix('_s')}_vs_{anchor}"] = row[key] / base[anchor][key]
                row[f"peak_rss_vs_{anchor}"] = row["peak_rss_mb"] / base[anchor]["peak_rss_mb"]
        if "trl_full" in base:
            full = base["trl_full"]
            row["train_opt_bytes_vs_trl_full"] = (row["trainable_bytes"] + row["optimizer_state_bytes"]) / (
                full["trainable_bytes"] + full["optimizer_state_bytes"]
            )
    return results


# The issue's targets (#20): (config, reference, anchor, bound on the step-time ratio)
TARGETS = [
    ("masked_row0.1", "live", "trl_full", 0.80),
    ("masked_row0.1", "live", "trl_lora_r8", 1.08),
    ("masked_element0.1", "live", "trl_full", 0.85),
    ("masked_ratio1.0", "live", "trl_full", 1.03),
    ("masked_row0.1", "precomputed", "trl_full", 0.80),
    ("masked_element0.1", "precomputed", "trl_full", 0.85),
    ("masked_ratio1.0", "precomputed", "trl_full", 1.05),
    ("npo_token_row0.1", "live", "masked_row0.1", 0.60),
]


def check_targets(results: list[dict]) -> list[dict]:
    """Each target of a configuration that ran, per allocator and dtype, with the measured ratio (wall time, median
    of the repeats) and whether it is met; peak RSS of the 10 % masks against LoRA's RSS plus their trainable + optimizer bytes, + 10 % (and, not a target,
    the same bound on LoRA over every Linear the masks cover: the layers whose inputs backward must keep)."""
    found = {(r["config"], r["reference"], (r["allocator"], r.get("dtype"))): r for r in results if "error" not in r}
    checks = []
    for setting in sorted({key[2] for key in found}, key=str):
        allocator, dtype = setting
        for config, reference, anchor, bound in TARGETS:
            row = found.get((config, reference, setting))
            if row is None:
                continue
            value = row.get(f"step_time_vs_{anchor}")
            checks.append(
                {
                    "target": f"{config} ({reference} ref) step <= {bound}x {anchor}",
                    "allocator": allocator,
                    "dtype": dtype,
                    "value": value,
                    "met": value is not None and value <= bound,
                }
            )
        for lora_name, is_target in (("trl_lora_r8", True), ("trl_lora_r8_all", False)):
            lora = found.get((lora_name, "live", setting))
            for config in ("masked_row0.1", "masked_element0.1"):
                row = found.get((config, "live", setting))
                if not (row and lora):
                    continue
                extra = (row["trainable_bytes"] + row["optimizer_state_bytes"]) / 2**20
                bound = 1.10 * (lora["peak_rss_mb"] + extra)
                label = "" if is_target else " (like for like, not a target)"
                checks.append(
                    {
                        "target": f"{config} peak RSS <= 1.1 x ({lora_name} RSS + trainable/optimizer MB) = "
                        f"{bound:.0f} MB{label}",
                        "allocator": allocator,
                        "dtype": dtype,
                        "value": row["peak_rss_mb"],
                        "met": row["peak_rss_mb"] <= bound,
                    }
                )
    return checks


def load_record() -> dict:
    return {
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "threads": os.environ.get("BENCH_THREADS", "2"),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def _model_record(path: str) -> dict:
    """What the model folder is (for the results file): its path and the shapes that set the step's cost."""
    config = json.loads((Path(path) / "config.json").read_text())
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    keys += ("num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "dtype")
    return {"path": str(Path(path).expanduser()), **{key: config.get(key) for key in keys}}


def _machine_record() -> dict:
    import platform

    import torch

    return {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke run (same as --size quick)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default: full)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    parser.add_argument("configs", nargs="*", help=f"configurations (default: all of {CONFIGS})")
    parser.add_argument(
        "--reference",
        choices=("live", "precomputed", "both"),
        default=None,
        help="reference log-probs (default: both; live with --model)",
    )
    parser.add_argument(
        "--allocator",
        choices=(*ALLOCATORS, "both"),
        default=None,
        help="host allocator settings (module doc; default: both, glibc with --model)",
    )
    parser.add_argument("--model", help="a transformers model folder instead of a random-init size (module doc)")
    parser.add_argument("--dtype", choices=(*MODEL_DTYPES, "both"), default="both", help="with --model: weights dtype")
    parser.add_argument("--digits", type=int, default=None, help="digits per answer (default: the size's)")
    parser.add_argument("--output", help="JSON file (default: benchmarks/results/masked_dpo[_size].json)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "model" if args.model else args.size or ("quick" if args.quick else "full")
    steps = args.steps or (3 if size in ("quick", "model") else 5)
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: expected a transformers model folder (with a config.json)")
    if args.single:
        print(json.dumps(run_one(args.single, size, args.precompute, steps, args.digits, args.model, args.dtype)))
        return
    load_before = load_record()
    reference = args.reference or ("live" if args.model else "both")
    precomputes = {"live": (False,), "precomputed": (True,), "both": (False, True)}[reference]
    allocator = args.allocator or ("glibc" if args.model else "both")
    allocators = ALLOCATORS if allocator == "both" else (allocator,)
    dtypes = (None,) if not args.model else MODEL_DTYPES if args.dtype == "both" else (args.dtype,)
    configs = args.configs or (MODEL_CONFIGS if args.model else CONFIGS)
    results = measure(configs, size, steps, args.repeats, precomputes, args.digits, allocators, args.model, dtypes)
    print(
        f"{'config':32} {'dtype':8} {'ref':12} {'alloc':7} {'s/step':>8} {'xfull':>6} {'xlora':>6} {'train+opt MB':>12} "
        f"{'xfull':>6} {'RSS MB':>8} {'faults':>8}"
    )
    for r in results:
        if "error" in r:
            print(
                f"{r['config']:32} {str(r.get('dtype')):8} {r['reference']:12} {r['allocator']:7} ERROR {r['error']}"
            )
            continue
        mb = (r["trainable_bytes"] + r["optimizer_state_bytes"]) / 2**20
        print(
            f"{r['config']:32} {r['dtype'][:8]:8} {r['reference']:12} {r['allocator']:7} {r['step_time_s']:8.3f} "
            f"{r.get('step_time_vs_trl_full', 0):6.2f} {r.get('step_time_vs_trl_lora_r8', 0):6.2f} {mb:12.2f} "
            f"{r.get('train_opt_bytes_vs_trl_full', 0):6.3f} {r['peak_rss_mb']:8.0f} {r['page_faults_per_step']:8.0f}"
        )
    targets = check_targets(results)
    for check in targets:
        value = "n/a" if check["value"] is None else f"{check['value']:.3f}"
        setting = check["allocator"] + (f", {check['dtype']}" if check["dtype"] else "")
        print(f"{'met    ' if check['met'] else 'NOT MET'} [{setting}] {check['target']}: {value}")
    from hf_align.io import write_json

    name = "real_model_benchmark" if args.model else f"masked_dpo{'' if size == 'full' else '_' + size}"
    default = RESULTS_DIR / f"{name}.json"
    out = Path(args.output) if args.output else default
    load = {"before": load_before, "after": load_record()}
    print(f"load average before/after: {load['before']['load_average']} / {load['after']['load_average']}")
    if max(load["before"]["load_average"][0], load["after"]["load_average"][0]) > (os.cpu_count() or 1):
        print("WARNING: the machine was busy with other work; step times are not comparable.")
    if args.model:
        record = {"size": size, "model": _model_record(args.model), "digits": args.digits or MODEL_DIGITS}
        record.update(batch=MODEL_BATCH, dtypes=list(dtypes), sampled_density=SAMPLED_DENSITY)
        record.update(permodule_density=PERMODULE_DENSITY, machine=_machine_record())
    else:
        record = {"size": size, "spec": SIZES[size], "digits": args.digits or SIZES[size]["digits"], "batch": 4}
    record.update(steps=steps, repeats=args.repeats, allocators=list(allocators), retain_env=RETAIN_ENV)
    record.update(load_average=load, targets=targets, results=results)
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
