"""Streaming AMA merge vs plain read+write of the same tensors, a naive shard-at-a-time merge, and mergekit.

Generates a random bf16 checkpoint pair (~1 GB each; ``--quick``: ~100 MB) in /tmp, then times, each in a fresh
subprocess that reports its own peak RSS (``resource.getrusage``):

* ``read+write``: read both inputs tensor by tensor and write one output with the same reader/writer, no maths
  (the I/O floor); goal: merge ≤ 1.25× this;
* ``merge_models``: ``hf_align.merging.merge_models(alpha=0.3)``; goal: peak RSS ≤ 0.5 GB;
* ``naive``: ``safetensors.torch.load_file`` both shards, merge, ``save_file`` — shard at a time;
* ``mergekit-yaml`` linear, only if ``mergekit-yaml`` is on PATH (install it into a separate venv; it is not
  an hf-align dependency).

    python -m benchmarks.merge [--quick] [--keep]

Prints a table and writes ``benchmarks/results/merge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import RESULTS_DIR, ROOT


RESULTS = RESULTS_DIR / "merge.json"

WORKERS = {
    "read+write": """
from hf_align.merging.streaming import Checkpoint, OutputTensor, ShardWriter
b, a = Checkpoint(BASE), Checkpoint(ALIGNED)
names = list(a.tensors)
w = ShardWriter(Path(OUT) / "model.safetensors", [OutputTensor(n, a.tensors[n].dtype, a.tensors[n].shape) for n in names])
for n in names:
    x = b.read(n); y = a.read(n); w.write(n, y); del x, y
w.close()
""",
    "merge_models": """
from hf_align.merging import merge_models
merge_models(BASE, ALIGNED, OUT, alpha=0.3, max_shard_size="500MB", progress=False)
""",
    "naive": """
from safetensors.torch import load_file, save_file
for f in sorted(Path(ALIGNED).glob("*.safetensors")):
    a = load_file(f); b = load_file(Path(BASE) / f.name)
    save_file({k: (0.3 * b[k].float() + 0.7 * a[k].float()).to(a[k].dtype) for k in a}, Path(OUT) / f.name)
    del a, b
""",
}


def generate(path: Path, total_bytes: int, seed: int, shard_bytes: int = 250_000_000) -> None:
    """A complete Llama checkpoint (so mergekit accepts it too): hidden = intermediate = vocab = 2048, bf16, as many
    layers as fit in ``total_bytes`` (seven 8 MB matrices each), written shard by shard."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    size, matrix = 2048, 2048 * 2048 * 2
    layers = max(1, (total_bytes - 2 * matrix) // (7 * matrix))
    modules = ["mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"]
    modules += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.{m}.weight" for m in modules]
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    per_shard = max(1, shard_bytes // matrix)
    shards = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for s, shard in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            n: torch.randn((size,) if "norm" in n else (size, size), generator=generator).bfloat16() for n in shard
        }
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": size, "intermediate_size": size,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": size,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))


def run_worker(name: str, base: Path, aligned: Path, out: Path) -> dict:
    code = f"""
import resource, time, json
from pathlib import Path
BASE, ALIGNED, OUT = {str(base)!r}, {str(aligned)!r}, {str(out)!r}
Path(OUT).mkdir(parents=True, exist_ok=True) if {name!r} != "merge_models" else None
start = time.perf_counter()
{WORKERS[name]}
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_mergekit(base: Path, aligned: Path, out: Path) -> dict | None:
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        return None
    config = out.parent / "mergekit.yaml"
    config.write_text(
        f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {aligned}\n    parameters: {{weight: 0.7}}\n"
    )
    code = f"""
import resource, subprocess, time, json
start = time.perf_counter()
subprocess.run([{exe!r}, {str(config)!r}, {str(out)!r}, "--lazy-unpickle"], check=True, capture_output=True)
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}}))
"""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as err:
        print(f"mergekit-yaml failed, skipped: {err.stderr[-500:]}")
        return None
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~100 MB per model instead of ~1 GB.")
    parser.add_argument("--rounds", type=int, default=2, help="Best of this many runs per configuration.")
    parser.add_argument("--keep", action="store_true", help="Keep the generated pair in /tmp.")
    args = parser.parse_args()
    size = 100_000_000 if args.quick else 1_000_000_000
    work = Path(tempfile.mkdtemp(prefix="hf_align_merge_bench_", dir="/tmp"))
    try:
        generate(work / "base", size, 0)
        generate(work / "aligned", size, 1)
        pair_bytes = sum(f.stat().st_size for f in (work / "aligned").glob("*.safetensors"))
        results = {}
        for name in WORKERS:
            runs = [run_worker(name, work / "base", work / "aligned", work / "out") for _ in range(args.rounds)]
            results[name] = {
                "seconds": min(r["seconds"] for r in runs),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            }
        mergekit = run_mergekit(work / "base", work / "aligned", work / "out")
        results["mergekit-yaml linear"] = mergekit or "skipped: mergekit-yaml not on PATH"
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = results["merge_models"]["seconds"] / results["read+write"]["seconds"]
    print(f"checkpoint pair: 2 × {pair_bytes / 1e9:.2f} GB bf16, {os.cpu_count()} CPU cores")
    print(f"{'configuration':<22} {'seconds':>8} {'peak RSS GB':>12}")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:<22} {r['seconds']:>8.2f} {r['peak_rss_gb']:>12.3f}")
        else:
            print(f"{name:<22} {r}")
    print(f"merge / read+write = {ratio:.2f}× (goal ≤ 1.25×); merge peak RSS goal ≤ 0.5 GB")
    summary = {"quick": args.quick, "model_bytes": pair_bytes, "cpu_count": os.cpu_count(), "results": results,
               "merge_over_read_write": ratio}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = RESULTS.with_name("merge_quick.json") if args.quick else RESULTS
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
