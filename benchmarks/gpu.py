"""GPU readiness: step time and peak CUDA memory of every method at real model shapes, in bf16, in one short run.

Random-init models with the shapes of Qwen2.5-0.5B and Llama-3.2-1B (no Hub: configs written here), the same
synthetic preference / SFT data and batch for every configuration, plus a 7B-shaped memory-only check:

* ``dpo_full`` (``trl.DPOTrainer``), ``dpo_lora_r16`` (TRL + PEFT LoRA r=16 on every linear layer),
* ``masked_row10`` / ``masked_element10`` (``MaskedDPOTrainer``, 10 % masks, bf16 deltas) and ``*_fp32deltas``,
* ``masked_row10_4bit`` (a bitsandbytes NF4 base, row deltas in the compute dtype),
* ``npo_token`` (``NPOTrainer``, ALLO's token-level NPO),
* ``sft_aligner_n1`` / ``sft_aligner_n10`` / ``sft_lora_r16`` (``trl.SFTTrainer`` with each adapter),
* ``merge_1gb`` (``merge_models`` of two ~1 GB checkpoints, streamed).

Each model runs in its own subprocess; configurations inside it run one after the other with the CUDA caches and
peak statistics reset in between. Writes JSON (machine, versions, per configuration: median step time, peak
``torch.cuda.max_memory_allocated``, trainable parameters; ratios to ``dpo_full`` and the LoRA baseline measured in
the same run).

    python -m benchmarks.gpu                 # needs CUDA; ~8 minutes on one H200
    python -m benchmarks.gpu --tiny          # a tiny model on CPU (or GPU): the CI smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import RESULTS_DIR, ROOT, module_command


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

MODELS = {
    "tiny": dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    ),
    "llama-7b-shape": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
    ),
}  # fmt: skip
TRAINING = [
    "dpo_full", "dpo_lora_r16", "masked_row10", "masked_element10", "masked_row10_fp32deltas",
    "masked_element10_fp32deltas", "masked_row10_4bit", "npo_token", "sft_aligner_n1", "sft_aligner_n10",
    "sft_lora_r16",
]  # fmt: skip
MEMORY_ONLY = ["dpo_lora_r16", "masked_row10", "masked_row10_4bit"]  # the 7B shape: one step each
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda_version=torch.version.cuda
        )
    import peft
    import transformers
    import trl

    info.update(transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__)
    return info


def _build(model_name: str, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(MODELS[model_name])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=1024, **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _tokenizer(vocab_size: int):
    from hf_align import testbed

    tokenizer = testbed.load_tokenizer()
    assert len(tokenizer) <= vocab_size, "the testbed tokenizer's ids must fit the model's vocabulary"
    return tokenizer


def _preference_rows(n: int, length: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def digits(k):
        return "".join(rng.choice("0123456789") for _ in range(k))

    return [
        {"prompt": f"rev {digits(length)}=", "chosen": digits(length), "rejected": digits(length)} for _ in range(n)
    ]


class _Clock:
    """Per-step wall time with the device synchronised at both ends (a step's kernels are then inside it)."""

    def __init__(self):
        import torch
        from transformers import TrainerCallback

        self.times: list[float] = []
        clock = self
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync()
                clock.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                clock.times.append(time.perf_counter() - clock.start)

        self.callback = Callback()


def _common_args(output_dir: str, steps: int, batch: int, cuda: bool) -> dict:
    from hf_align.testbed import quiet_training_args  # the parent process that schedules the runs stays light

    return quiet_training_args(
        output_dir=output_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
        logging_steps=10_000, seed=0,
        gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda,
    )  # fmt: skip


def _trainer(name: str, model_name: str, steps: int, batch: int, length: int, workdir: str, clock: _Clock):
    """Build the trainer of configuration ``name`` (its model loaded fresh: nothing is shared between them)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from hf_align.masks import NeuronMask
    from hf_align.peft_tuners import AlignerConfig
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer, NPOConfig, NPOTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = _tokenizer(MODELS[model_name]["vocab_size"])
    rows = _preference_rows(batch * (steps + 1), length)
    common = dict(_common_args(f"{workdir}/{name}", steps, batch, cuda), max_length=4 * length)
    kwargs = dict(processing_class=tokenizer, callbacks=[clock.callback])
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR, task_type="CAUSAL_LM")
    if name.endswith("_4bit"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        saved = Path(workdir) / f"{model_name}-base"
        if not saved.exists():
            _build(model_name, dtype).save_pretrained(saved)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(saved, quantization_config=quant, dtype=dtype)
    else:
        model = _build(model_name, dtype)
    if cuda and not name.endswith("_4bit"):
        model = model.to("cuda")
    data = Dataset.from_list(rows)
    # a random-init model has no path to build TRL's reference copy from: give the copy (LoRA: adapter off)
    reference = None if "lora" in name or name.startswith(("masked_", "sft_")) else copy.deepcopy(model)
    if name.startswith("dpo_"):
        args = DPOConfig(**common)
        peft_config = lora if "lora" in name else None
        return DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, peft_config=peft_config,
                          **kwargs)  # fmt: skip
    if name.startswith("masked_"):
        granularity = "row" if "_row" in name else "element"
        mask = NeuronMask.random(model, 0.1, granularity, seed=0)
        delta_dtype = "float32" if "fp32deltas" in name else "auto"
        args = MaskedDPOConfig(**common, neuron_delta_dtype=delta_dtype)
        return MaskedDPOTrainer(model=model, args=args, train_dataset=data, neuron_mask=mask, **kwargs)
    if name == "npo_token":
        forget = Dataset.from_list([{"prompt": r["prompt"], "completion": r["rejected"]} for r in rows])
        args = NPOConfig(**common, npo_level="token")
        return NPOTrainer(model=model, ref_model=reference, args=args, train_dataset=forget, **kwargs)
    sft = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    start = min(2, model.config.num_hidden_layers - 1)  # the paper's start layer; the tiny model has 2 layers
    aligner = AlignerConfig(num_tokens=1 if name.endswith("n1") else 10, start_layer=start)
    peft_config = lora if "lora" in name else aligner
    return SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=sft, peft_config=peft_config, **kwargs)


def _reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # the process's peak RSS (CPU runs)


def run_training(name: str, model_name: str, steps: int, batch: int, length: int, workdir: str) -> dict:
    _reset_memory()
    clock = _Clock()
    trainer = _trainer(name, model_name, steps, batch, length, workdir, clock)
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    times = clock.times[1:] or clock.times  # the first step warms up kernels and the allocator
    result = {
        "config": name, "model": model_name, "steps": len(clock.times), "step_time_s": statistics.median(times),
        "peak_memory_bytes": _peak_bytes(), "trainable_params": trainable,
    }  # fmt: skip
    del trainer
    _reset_memory()
    return result


def run_merge(model_name: str, workdir: str) -> dict:
    import torch

    from hf_align.merging import merge_models

    dtype = torch.bfloat16
    paths = []
    for seed, role in ((0, "base"), (1, "aligned")):
        path = Path(workdir) / f"merge-{role}"
        if not path.exists():
            torch.manual_seed(seed)
            _build(model_name, dtype).save_pretrained(path)
        paths.append(path)
    size = sum(f.stat().st_size for f in paths[1].glob("*.safetensors"))
    start = time.perf_counter()
    merge_models(paths[0], paths[1], Path(workdir) / "merged", alpha=0.3, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    return {"config": "merge_1gb", "model": model_name, "seconds": seconds, "checkpoint_bytes": size,
            "gb_per_s": size / 2**30 / seconds}  # fmt: skip


def run_model(model_name: str, configs: list[str], steps: int, batch: int, length: int, merge: bool) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in configs:
            try:
                results.append(run_training(name, model_name, steps, batch, length, workdir))
            except Exception as error:  # one configuration failing must not hide the others' numbers
                results.append({"config": name, "model": model_name, "error": f"{type(error).__name__}: {error}"})
                _reset_memory()
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if merge:
            try:
                results.append(run_merge(model_name, workdir))
            except Exception as error:
                results.append(
                    {"config": "merge_1gb", "model": model_name, "error": f"{type(error).__name__}: {error}"}
                )
    return results


def add_ratios(results: list[dict]) -> None:
    """Step time and peak memory against ``dpo_full`` / ``dpo_lora_r16`` (DPO rows) and ``sft_lora_r16`` (SFT)."""
    for row in results:
        if "step_time_s" not in row:
            continue
        same = {r["config"]: r for r in results if r.get("model") == row["model"] and "step_time_s" in r}
        anchors = ("sft_lora_r16",) if row["config"].startswith("sft_") else ("dpo_full", "dpo_lora_r16")
        for anchor in anchors:
            if anchor in same:
                row[f"step_time_vs_{anchor}"] = row["step_time_s"] / same[anchor]["step_time_s"]
                row[f"peak_memory_vs_{anchor}"] = row["peak_memory_bytes"] / same[anchor]["peak_memory_bytes"]


def plan(tiny: bool) -> list[tuple[str, list[str], int, int, int, bool]]:
    """(model, configurations, steps, batch, tokens per completion, whether to merge) per subprocess."""
    if tiny:
        return [("tiny", TRAINING, 3, 2, 8, True)]
    return [
        ("qwen2.5-0.5b", TRAINING, 6, 4, 128, True),
        ("llama-3.2-1b", TRAINING, 6, 4, 128, False),
        ("llama-7b-shape", MEMORY_ONLY, 2, 1, 128, False),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: the CPU smoke run (CI)")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu[_tiny].json)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    parser.add_argument("--single", nargs=6, help=argparse.SUPPRESS)  # model configs steps batch length merge
    args = parser.parse_args(argv)
    if args.single:
        model, configs, steps, batch, length, merge = args.single
        results = run_model(model, configs.split(","), int(steps), int(batch), int(length), merge == "1")
        print(json.dumps(results))
        return 0
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA (or --tiny for the CPU smoke run).", file=sys.stderr)
        return 2
    started, load_before = time.perf_counter(), os.getloadavg()
    results = []
    for model, configs, steps, batch, length, merge in plan(args.tiny):
        configs = [c for c in configs if args.only is None or c in args.only]
        merge = merge and (args.only is None or "merge_1gb" in args.only)
        command = module_command("gpu", "--single", model, ",".join(configs), str(steps), str(batch),
                                 str(length), "1" if merge else "0")  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results.append({"model": model, "error": f"the {model} subprocess failed: {tail}"})
        else:
            results.extend(json.loads(lines[-1]))
    add_ratios(results)
    from hf_align.io import write_json

    report = {
        "machine": _device_info(), "tiny": args.tiny, "wall_s": time.perf_counter() - started,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg()), "cpus": os.cpu_count()},
        "results": results,
    }  # fmt: skip
    out = Path(args.out) if args.out else RESULTS_DIR / f"gpu{'_tiny' if args.tiny else ''}.json"
    write_json(out, report)
    for row in results:
        print(json.dumps(row))
    print(f"wrote {out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
