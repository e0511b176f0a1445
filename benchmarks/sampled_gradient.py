"""Sampled weight gradients: is computing only an entry mask's selected entries of ``dW = dYᵀ X`` faster than the
dense ``dW`` (one GEMM) followed by a gather?

An element (ALLO) delta's gradient is ``dW`` at its selected entries. The dense route forms all of ``dW``; its cost
does not depend on the mask. The sampled routes compute ``nnz`` dot products of length ``T`` (tokens):

* ``dense``: ``(dYᵀ X).view(-1).gather(index)`` -- what ``sparse_update`` does by default;
* ``sddmm``: ``torch.sparse.sampled_addmm`` on the mask's CSR pattern (fp32 only on CPU: bf16 operands are cast
  up, which is exact, and the result rounded to the delta's dtype once);
* ``per_entry``: ``(dY[:, rows] * X[:, cols]).sum(0)`` (index_select + per-entry products; materializes
  ``nnz × T`` floats, shown on the smallest settings only).

Per module shape of SmolLM2-135M (q, k, v, o, gate/up, down), density and dtype, at realistic token counts (a DPO
batch of 2 pairs × 64 tokens = 256 rows of ``X``; 4 pairs × 128 = 1024). Masks are random at the given density:
the sampled kernels' cost depends on ``nnz`` and the rows it spans, and a top-k entry mask from accumulated
gradients on SmolLM2 touches ~98 % of rows, as a random one does. Writes ``benchmarks/results/sampled_gradient.json``.

    OMP_NUM_THREADS=1 python -m benchmarks.sampled_gradient
    python -m benchmarks.sampled_gradient --quick    # a smoke run (one shape, one density)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from benchmarks import RESULTS_DIR


# SmolLM2-135M: hidden 576, 9 heads / 3 kv heads of 64, intermediate 1536; (out, in) of each Linear weight, and the
# density an accumulated-gradient top-10 % entry mask gives that module (issue #32)
MODULES = {
    "q_proj": ((576, 576), 0.04),
    "k_proj": ((192, 576), 0.10),
    "v_proj": ((192, 576), 0.37),
    "o_proj": ((576, 576), 0.22),
    "gate_proj": ((1536, 576), 0.08),
    "up_proj": ((1536, 576), 0.08),
    "down_proj": ((576, 1536), 0.08),
}
DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.6)
TOKENS = (256, 1024)
DTYPES = ("float32", "bfloat16")


def _time(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def case(shape: tuple[int, int], density: float, tokens: int, dtype: str, repeats: int, seed: int = 0) -> dict:
    """One setting's times (ms) for each route, and the largest difference between the routes' results."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    grad = torch.randn(tokens, out_features, generator=generator).to(dt)
    inputs = torch.randn(tokens, in_features, generator=generator).to(dt)
    mask = torch.rand(shape, generator=generator) < density
    index = mask.view(-1).nonzero().view(-1)
    pattern = torch.sparse_csr_tensor(
        *(t.to(torch.int64) for t in _csr_indices(mask)), torch.zeros(index.numel()), size=shape
    )

    def dense():
        return (grad.t() @ inputs).view(-1).gather(0, index)

    def sddmm():
        return torch.sparse.sampled_addmm(pattern, grad.t().float(), inputs.float(), beta=0.0).values().to(dt)

    rows, cols = index // in_features, index % in_features

    def per_entry():
        return (grad.index_select(1, rows).float() * inputs.index_select(1, cols).float()).sum(0).to(dt)

    routes = {"dense": dense, "sddmm": sddmm}
    if out_features * in_features * density * tokens <= 2**24:  # nnz × T floats materialized: small settings only
        routes["per_entry"] = per_entry
    reference = (grad.double().t() @ inputs.double()).view(-1).gather(0, index)
    row = {"shape": list(shape), "density": density, "nnz": index.numel(), "tokens": tokens, "dtype": dtype}
    for name, fn in routes.items():
        row[f"{name}_ms"] = _time(fn, repeats)
        row[f"{name}_max_rel_err"] = float(((fn().double() - reference).abs().max() / reference.abs().max()).item())
    row["sddmm_vs_dense"] = row["sddmm_ms"] / row["dense_ms"]
    return row


def _csr_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR row pointers and column indices of a 2-D boolean mask (row-major, as ``nonzero`` orders entries)."""
    counts = mask.sum(1)
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    return crow, mask.nonzero()[:, 1]


def crossover(rows: list[dict]) -> list[dict]:
    """Per module shape, tokens and dtype: the largest density measured at which ``sddmm`` still beats dense."""
    found = {}
    for r in rows:
        key = (tuple(r["shape"]), r["tokens"], r["dtype"])
        best = found.setdefault(key, 0.0)
        if r["sddmm_vs_dense"] < 1.0 and r["density"] > best:
            found[key] = r["density"]
    return [
        {"shape": list(k[0]), "tokens": k[1], "dtype": k[2], "sddmm_wins_up_to_density": v} for k, v in found.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, one density: a smoke run")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per route (median reported)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "sampled_gradient.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    shapes = {tuple(s) for s, _ in MODULES.values()}
    settings = [(s, d, t, dt) for s in sorted(shapes) for t in TOKENS for dt in DTYPES for d in DENSITIES]
    # each module at the density the real mask gives it
    settings += [(s, d, t, dt) for s, d in MODULES.values() for t in TOKENS for dt in DTYPES]
    if args.quick:
        settings = [((192, 576), 0.1, 64, "float32")]
    rows = []
    for shape, density, tokens, dtype in dict.fromkeys(settings):
        row = case(shape, density, tokens, dtype, args.repeats)
        rows.append(row)
        print(
            f"{str(shape):12} d={density:4.2f} T={tokens:5d} {dtype:8} dense {row['dense_ms']:7.3f} ms "
            f"sddmm {row['sddmm_ms']:7.3f} ms ({row['sddmm_vs_dense']:5.2f}x)"
            + (f" per-entry {row['per_entry_ms']:7.2f} ms" if "per_entry_ms" in row else ""),
            flush=True,
        )
    modules = []
    for name, (shape, density) in MODULES.items():
        for r in rows:
            if tuple(r["shape"]) == shape and r["density"] == density:
                modules.append({"module": name, **{k: r[k] for k in ("tokens", "dtype", "density", "sddmm_vs_dense")}})
    from hf_align.io import write_json

    record = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "repeats": args.repeats,
        "real_mask_modules": modules,
        "crossover": crossover(rows),
        "results": rows,
    }
    write_json(args.output, record)
    print(f"load average before/after: {record['load_average']['before']} / {record['load_average']['after']}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
