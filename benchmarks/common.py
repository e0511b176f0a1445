"""What the step-time benchmarks (``masked_dpo``, ``scaling``, ``profile_masked_dpo``) share: the model they train (a
random-init size or a transformers folder, in a dtype), where its masks come from, the subprocess each configuration
runs in, and what a results file records about the machine and its load.

One set of options for all three scripts (:func:`add_model_arguments`), so ``--model`` / ``--dtype`` /
``--mask_source`` mean the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

from benchmarks import ROOT


MODEL_DTYPES = ("bfloat16", "float32")
MASK_SOURCES = ("random", "accumulated")
WARMUP_STEPS = 8  # DPO steps whose accumulated |gradient| ranks the entries of "accumulated" masks


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--mask_source`` and ``--warmup_steps``, with the same meaning in every script."""
    parser.add_argument("--model", help="a transformers model folder instead of a random-init size (its tokenizer)")
    parser.add_argument(
        "--dtype",
        choices=(*MODEL_DTYPES, "both"),
        default="both",
        help="with --model: bfloat16 (bf16 weights, bf16 autocast) or float32 (fp32 weights, no autocast)",
    )
    parser.add_argument(
        "--mask_source",
        choices=MASK_SOURCES,
        default=None,
        help="the 10 %% masks: seeded random, or ALLO's (top 10 %% by |gradient| accumulated over --warmup_steps DPO "
        "steps with MaskAccumulationCallback); default: accumulated with --model, random on a random-init size",
    )
    parser.add_argument(
        "--warmup_steps", type=int, default=WARMUP_STEPS, help="DPO steps that score the accumulated masks"
    )


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line naming the option, before any model is loaded."""
    if args.model and not (Path(args.model).expanduser() / "config.json").is_file():
        parser.error(f"--model {args.model}: expected a transformers model folder (with a config.json)")
    if args.warmup_steps < 1:
        parser.error(f"--warmup_steps: expected a positive number of steps, got {args.warmup_steps}")


def model_dtypes(args: argparse.Namespace) -> tuple[str | None, ...]:
    """The dtypes to run: ``(None,)`` for a random-init size (fp32 weights, bf16 autocast), else ``--dtype``'s."""
    if not args.model:
        return (None,)
    return MODEL_DTYPES if args.dtype == "both" else (args.dtype,)


def mask_source(args: argparse.Namespace, model_path: str | None) -> str:
    """``--mask_source``, else what is honest for the model: a real model's masks come from its gradients."""
    return args.mask_source or ("accumulated" if model_path else "random")


def load_model(spec: dict | None, model_path: str | None, dtype: str | None):
    """The random-init Llama of ``spec`` with the testbed's tokenizer, or the folder ``model_path`` (and its own
    tokenizer) in ``dtype`` (default bfloat16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_align import testbed

    if model_path is None:
        model = testbed.load_random_tiny("llama", **spec)
        model.config.max_position_embeddings = 512
        return model, testbed.load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype or "bfloat16"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_record(path: str) -> dict:
    """What the model folder is (for the results file): its path and the shapes that set the step's cost."""
    config = json.loads((Path(path).expanduser() / "config.json").read_text())
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    keys += ("num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "dtype")
    return {"path": str(Path(path).expanduser()), **{key: config.get(key) for key in keys}}


def bench_threads() -> int:
    """The torch threads each configuration's process uses (``BENCH_THREADS``, default 2)."""
    return int(os.environ.get("BENCH_THREADS", "2"))


def machine_record() -> dict:
    import torch

    return {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": bench_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip


def load_record() -> dict:
    return {
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "threads": str(bench_threads()),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def run_record(load_before: dict) -> dict:
    """The machine and the load before (``load_before``, taken at the start) and after the run; warns when busy."""
    load = {"before": load_before, "after": load_record()}
    print(f"load average before/after: {load['before']['load_average']} / {load['after']['load_average']}")
    if max(load["before"]["load_average"][0], load["after"]["load_average"][0]) > (os.cpu_count() or 1):
        print("WARNING: the machine was busy with other work; step times are not comparable.")
    return {"machine": machine_record(), "load_average": load}


def run_child(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a benchmark subprocess (from the repository root) and read the JSON object it prints last; on failure
    ``{"error": its last line of stderr}``."""
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
