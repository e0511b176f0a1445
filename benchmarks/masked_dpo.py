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

``--mask_source`` sets where the 10 % masks come from: ``random`` (seeded; the default on a random-init size) or
``accumulated`` (the default with ``--model``): ALLO's masks, the top 10 % of entries (and of decoder rows) by the
|gradient| a ``--warmup_steps``-step DPO run accumulates with ``MaskAccumulationCallback``, built once in their own
process and shared by every configuration and dtype. The JSON's ``masks`` records each parameter's and each module
kind's density and the fractions of rows and columns it touches; each run records the digest of the mask it trained.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import hashlib
import itertools
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import RESULTS_DIR, module_command
from benchmarks.common import (
    add_model_arguments,
    bench_threads,
    check_model_arguments,
    load_model,
    load_record,
    mask_source,
    model_dtypes,
    model_record,
    run_child,
    run_record,
)


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
MASK_RATIO = 0.1  # the masked configurations' "10 %"
LEARNING_RATE = 1e-5


def default_configs(model_path: str | None, source: str) -> list[str]:
    """The configurations run when none is named: :data:`CONFIGS` on a random-init size, :data:`MODEL_CONFIGS` on a
    model folder; "permodule" stands in for accumulated masks with random ones, so it runs only with random masks."""
    if model_path is None:
        return list(CONFIGS)
    return [c for c in MODEL_CONFIGS if source == "random" or "permodule" not in c]


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


def _mask(model, granularity: str, masks: str | None):
    """The 10 % ``granularity`` mask of a configuration: the one saved in ``masks/<granularity>`` (accumulated
    gradients, :func:`build_masks`), or a seeded random one."""
    from hf_align.masks import NeuronMask

    if masks is None:
        return NeuronMask.random(model, MASK_RATIO, granularity, seed=0)
    mask = NeuronMask.load(Path(masks) / granularity)
    mask.validate(model)
    return mask


def mask_digest(mask) -> str:
    """A short fingerprint of a mask's selection: which mask a configuration's process trained with."""
    digest = hashlib.sha256()
    for name in sorted(mask.masks):
        digest.update(name.encode())
        digest.update(mask.masks[name].numpy().tobytes())
    return digest.hexdigest()[:16]


def make_trainer(
    name: str,
    size: str,
    precompute: bool,
    steps: int,
    callbacks: list,
    digits: int | None = None,
    model_path: str | None = None,
    dtype: str | None = None,
    *,
    masks: str | None = None,
    batch: int | None = None,
    untimed: int = 2,
    data_seed: int = 0,
):
    """The configuration ``name`` on the ``size`` model (or the folder ``model_path`` in ``dtype``), ready to train
    ``steps + untimed`` steps, with the 10 % masks saved in ``masks`` (else random); returns the trainer, the model
    and the mask (or ``None``). Shared with ``benchmarks/profile_masked_dpo.py``."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from hf_align.testbed import quiet_training_args
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    torch.set_num_threads(bench_threads())
    digits = digits or (MODEL_DIGITS if model_path else SIZES[size]["digits"])
    spec = None if model_path else {k: v for k, v in SIZES[size].items() if k != "digits"}
    model, tokenizer = load_model(spec, model_path, dtype)
    model.train()
    batch = batch or (MODEL_BATCH if model_path else 4)
    data = _dataset(batch * (steps + untimed), digits, seed=data_seed)
    tmp = tempfile.mkdtemp()
    common = quiet_training_args(
        # TRL's default, kept: the committed numbers were measured with bf16 autocast; a model folder's "float32"
        # runs without autocast
        bf16=model_path is None or dtype != "float32",
        output_dir=tmp,
        per_device_train_batch_size=batch,
        max_steps=steps + untimed,
        learning_rate=LEARNING_RATE,
        logging_steps=1000,
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=False,
        seed=0,
    )
    ref = None if precompute else copy.deepcopy(model)
    mask = None
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
            from hf_align.sparse_update import MaskedAdamW

            mask = _mask(model, "element", masks)
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
        from hf_align.trainers import NPOConfig, NPOTrainer

        common.pop("precompute_ref_log_probs")
        mask = _mask(model, "row", masks)
        forget = data.map(lambda row: {"completion": row["rejected"]}, remove_columns=["chosen", "rejected"])
        trainer = NPOTrainer(
            model=model,
            args=NPOConfig(**common, npo_level="token", precompute_ref_log_probs=precompute),
            train_dataset=forget,
            processing_class=tokenizer,
            callbacks=callbacks,
            neuron_mask=mask,
        )
    else:
        from hf_align.masks import NeuronMask

        if name == "masked_ratio1.0":
            mask = NeuronMask.full(model, "element")
        elif name.startswith("masked_element_permodule"):
            mask = _permodule_mask(model)
        else:
            mask = _mask(model, "row" if "row" in name else "element", masks)
        if name.endswith("_sampled"):
            common["neuron_sampled_gradient_density"] = SAMPLED_DENSITY[
                "float32" if dtype == "float32" else "bfloat16"
            ]
        trainer = MaskedDPOTrainer(model=model, args=MaskedDPOConfig(**common), neuron_mask=mask, **kwargs)
    return trainer, model, mask


def _touched(mask, axis: int) -> tuple[int, int, int, int]:
    """``(rows touched, rows, columns touched, columns)`` of one tensor's mask (rows: output features on ``axis``);
    a row mask touches every column of its rows, a 1-D parameter is one column."""
    if mask.dim() == 1:
        selected = int(mask.sum())
        return selected, mask.numel(), int(selected > 0), 1
    mask = mask.movedim(axis, 0).reshape(mask.shape[axis], -1)
    return int(mask.any(1).sum()), mask.shape[0], int(mask.any(0).sum()), mask.shape[1]


def mask_statistics(mask, axes: dict[str, int] | None = None) -> dict:
    """Per parameter and per module kind (``q_proj``, ``embed_tokens``, ...): the density of the mask and the
    fractions of rows and columns it touches (what a row-restricted weight gradient would have to form)."""
    from hf_align.architectures import neuron_axis

    per_parameter, kinds = {}, {}
    for name, values in mask.masks.items():
        rows, num_rows, cols, num_cols = _touched(values, neuron_axis(axes, name))
        selected = int(values.sum())
        per_parameter[name] = {"shape": list(values.shape), "density": selected / values.numel(),
                               "rows_touched": rows / num_rows, "columns_touched": cols / num_cols}  # fmt: skip
        parts = name.split(".")
        kind = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
        counts = kinds.setdefault(kind, [0, 0, 0, 0, 0, 0])
        for i, value in enumerate((selected, values.numel(), rows, num_rows, cols, num_cols)):
            counts[i] += value
    per_kind = {kind: {"density": c[0] / c[1], "rows_touched": c[2] / c[3], "columns_touched": c[4] / c[5]}
                for kind, c in kinds.items()}  # fmt: skip
    return {"density": mask.ratio, "digest": mask_digest(mask), "per_kind": per_kind, "per_parameter": per_parameter}


def build_masks(
    size: str, model_path: str | None, digits: int | None, warmup_steps: int, directory: str, batch: int | None = None
) -> dict:
    """ALLO's masks for the benchmark: ``warmup_steps`` of TRL's full DPO (fp32 weights for a model folder) with
    :class:`~hf_align.callbacks.MaskAccumulationCallback` summing |gradient| per entry; the entry mask keeps the top
    10 % of entries, the row mask the top 10 % of decoder rows by their entries' summed scores (what the callback's
    row granularity sums). Both are saved under ``directory`` (``row/``, ``element/``); returns their statistics."""
    from hf_align.architectures import neuron_axes, neuron_axis
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.callbacks.mask_accumulation import MASK_DIR
    from hf_align.masks import NeuronMask
    from hf_align.scores import reduce_magnitude

    callback = MaskAccumulationCallback(method="gradient", granularity="element", select_ratio=MASK_RATIO)
    dtype = "float32" if model_path else None
    start = time.perf_counter()
    trainer, model, _ = make_trainer(
        "trl_full", size, False, warmup_steps, [callback], digits, model_path, dtype,
        batch=batch, untimed=0, data_seed=1,
    )  # fmt: skip
    trainer.train()
    seconds = time.perf_counter() - start
    output = Path(trainer.args.output_dir)
    element = NeuronMask.load(output / MASK_DIR)  # what the callback selected at train end (select_ratio)
    scores = callback.scores()
    shutil.rmtree(output, ignore_errors=True)  # the callback's score files: one value per parameter
    axes = neuron_axes(model)
    rows = NeuronMask.full(model, "row").masks  # the tensors a row mask covers (decoder matrices)
    row_scores = {name: reduce_magnitude(scores[name], "row", "abs", neuron_axis(axes, name)) for name in rows}
    row = NeuronMask.from_scores(row_scores, MASK_RATIO)
    record = {"method": "gradient (MaskAccumulationCallback, pre-clip |g| summed over steps)", "ratio": MASK_RATIO,
              "warmup_steps": warmup_steps, "warmup_dtype": dtype or "float32 + bf16 autocast",
              "warmup_learning_rate": LEARNING_RATE, "warmup_data_seed": 1, "warmup_seconds": seconds}  # fmt: skip
    for granularity, mask in (("element", element), ("row", row)):
        mask.validate(model)
        mask.save(Path(directory) / granularity)
        record[granularity] = mask_statistics(mask, axes)
    return record


def masks_for(
    source: str, size: str, model_path: str | None, digits: int | None, warmup_steps: int, batch: int | None = None
) -> tuple[str | None, dict]:
    """The masks folder the configurations load (``None``: random masks) and what the results file says of them;
    the accumulated masks are built in their own process, once for every configuration and dtype."""
    if source == "random":
        return None, {"source": "random", "ratio": MASK_RATIO, "seed": 0}
    directory = tempfile.mkdtemp(prefix="bench-masks-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    command = module_command("masked_dpo", "--build_masks", directory, "--warmup_steps", str(warmup_steps))
    command += ["--size", size] if model_path is None else ["--model", model_path]
    command += ["--digits", str(digits)] if digits else []
    command += ["--batch", str(batch)] if batch else []
    record = run_child(command)
    if "error" in record:
        raise RuntimeError(f"building the accumulated masks failed: {record['error']}")
    return directory, {"source": "accumulated", **record}


def run_one(
    name: str,
    size: str,
    precompute: bool,
    steps: int,
    digits: int | None = None,
    model_path: str | None = None,
    dtype: str | None = None,
    masks: str | None = None,
    batch: int | None = None,
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

    trainer, model, mask = make_trainer(
        name, size, precompute, steps, [Timer()], digits, model_path, dtype, masks=masks, batch=batch
    )
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
        "torch_threads": torch.get_num_threads(),
        "mask": None if mask is None else {"density": mask.ratio, "digest": mask_digest(mask)},
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
    masks: str | None = None,
    batch: int | None = None,
) -> dict:
    """One configuration in a fresh process (its own peak RSS; the allocator's tunables are read at start-up)."""
    command = module_command("masked_dpo", "--single", name, "--steps", str(steps))
    command += ["--size", size] if model_path is None else []
    command += ["--precompute"] if precompute else []
    command += ["--digits", str(digits)] if digits else []
    command += ["--model", model_path, "--dtype", dtype or "bfloat16"] if model_path else []
    command += ["--masks", masks] if masks else []
    command += ["--batch", str(batch)] if batch else []
    row = run_child(command, allocator_env(allocator))
    if "error" in row:
        reference = "precomputed" if precompute else "live"
        row = {"config": name, "reference": reference, "allocator": allocator, "dtype": dtype, **row}
    return row


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
    masks: str | None = None,
    batch: int | None = None,
):
    """Each configuration in its own subprocess, ``repeats`` times, interleaved (a change in the machine's load hits
    every configuration alike); the medians, with every repeat's values and the 1-minute load after each run.
    Ratios compare configurations measured with the same reference, allocator and dtype. ``masks``: the folder of
    :func:`masks_for` (else random masks)."""
    runs: dict[tuple, list[dict]] = {}
    for repeat in range(repeats):
        for allocator, dtype, precompute, name in itertools.product(allocators, dtypes, precomputes, names):
            row = _run_single(name, size, steps, precompute, allocator, digits, model_path, dtype, masks, batch)
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
    add_model_arguments(parser)
    parser.add_argument("--digits", type=int, default=None, help="digits per answer (default: the size's)")
    parser.add_argument("--output", help="JSON file (default: benchmarks/results/masked_dpo[_size].json)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--build_masks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "model" if args.model else args.size or ("quick" if args.quick else "full")
    steps = args.steps or (3 if size in ("quick", "model") else 5)
    check_model_arguments(parser, args)
    if args.build_masks:
        print(json.dumps(build_masks(size, args.model, args.digits, args.warmup_steps, args.build_masks, args.batch)))
        return
    if args.single:
        row = run_one(
            args.single, size, args.precompute, steps, args.digits, args.model, args.dtype, args.masks, args.batch
        )
        print(json.dumps(row))
        return
    load_before = load_record()
    reference = args.reference or ("live" if args.model else "both")
    precomputes = {"live": (False,), "precomputed": (True,), "both": (False, True)}[reference]
    allocator = args.allocator or ("glibc" if args.model else "both")
    allocators = ALLOCATORS if allocator == "both" else (allocator,)
    dtypes = model_dtypes(args)
    source = mask_source(args, args.model)
    configs = args.configs or default_configs(args.model, source)
    masks, mask_record = masks_for(source, size, args.model, args.digits, args.warmup_steps)
    results = measure(
        configs, size, steps, args.repeats, precomputes, args.digits, allocators, args.model, dtypes, masks
    )
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
    if args.model:
        record = {"size": size, "model": model_record(args.model), "digits": args.digits or MODEL_DIGITS}
        record.update(batch=MODEL_BATCH, dtypes=list(dtypes), sampled_density=SAMPLED_DENSITY)
        record.update(permodule_density=PERMODULE_DENSITY)
    else:
        record = {"size": size, "spec": SIZES[size], "digits": args.digits or SIZES[size]["digits"], "batch": 4}
    record.update(steps=steps, repeats=args.repeats, allocators=list(allocators), retain_env=RETAIN_ENV)
    record.update(run_record(load_before), masks=mask_record, targets=targets, results=results)
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
