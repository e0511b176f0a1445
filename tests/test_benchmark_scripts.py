"""The step-time benchmarks run end to end (a smoke run: tiny model, one repeat; numbers are not checked here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def test_masked_dpo_benchmark_reports_medians_targets_and_load(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks.masked_dpo", "--quick", "--repeats", "2", "--steps", "1"]
    command += ["--reference", "live", "masked_row0.1", "trl_lora_r8", "--output", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    rows = {(r["config"], r["allocator"]): r for r in record["results"]}
    configs = {"masked_row0.1", "trl_lora_r8"}
    assert set(rows) == {(c, a) for c in configs for a in ("glibc", "retain")}
    assert not any("error" in r for r in rows.values())
    for allocator in ("glibc", "retain"):  # ratios never mix allocators
        row, lora = rows["masked_row0.1", allocator], rows["trl_lora_r8", allocator]
        assert len(row["step_time_s_repeats"]) == 2 and min(row["step_time_s_repeats"]) <= row["step_time_s"]
        assert row["step_time_vs_trl_lora_r8"] == row["step_time_s"] / lora["step_time_s"]
        assert row["trainable_bytes"] < 0.2 * 4 * row["num_params"]
        assert row["page_faults_per_step"] >= 0 and len(row["page_faults_per_step_repeats"]) == 2
    assert {"before", "after"} <= set(record["load_average"])
    assert record["retain_env"]["MALLOC_TRIM_THRESHOLD_"]
    targets = {(t["target"], t["allocator"]) for t in record["targets"]}
    for allocator in ("glibc", "retain"):
        assert any(
            t.startswith("masked_row0.1 (live ref) step <= 1.08x trl_lora_r8") and a == allocator for t, a in targets
        )


@pytest.mark.slow  # ~45 s: four subprocesses
def test_masked_dpo_benchmark_takes_a_model_folder_and_compares_within_each_dtype(tmp_path):
    """``--model PATH``: a transformers folder (here a tiny Llama saved from a config, with its own tokenizer) in bf16
    and fp32; ratios never mix dtypes; the sampled-gradient configuration runs."""
    from hf_align import testbed

    folder = tmp_path / "model"
    testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=48).save_pretrained(folder)
    testbed.load_tokenizer().save_pretrained(folder)
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks.masked_dpo", "--model", str(folder), "--repeats", "1", "--steps", "1"]
    command += ["--digits", "8", "trl_full", "masked_element0.1_sampled", "--output", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    rows = {(r["config"], r["dtype"]): r for r in record["results"]}
    assert set(rows) == {(c, d) for c in ("trl_full", "masked_element0.1_sampled") for d in ("bfloat16", "float32")}
    assert not any("error" in r for r in rows.values())
    for dtype in ("bfloat16", "float32"):
        row, full = rows["masked_element0.1_sampled", dtype], rows["trl_full", dtype]
        assert row["allocator"] == "glibc" and row["reference"] == "live"
        assert row["step_time_vs_trl_full"] == row["step_time_s"] / full["step_time_s"]
    assert rows["trl_full", "float32"]["trainable_bytes"] == 2 * rows["trl_full", "bfloat16"]["trainable_bytes"]
    assert record["model"]["num_hidden_layers"] == 2 and record["batch"] == 2
    assert {"before", "after"} <= set(record["load_average"]) and record["machine"]["torch"]


def test_sampled_gradient_benchmark_smoke(tmp_path):
    out = tmp_path / "sampled.json"
    command = [sys.executable, "-m", "benchmarks.sampled_gradient", "--quick", "--repeats", "1", "--output", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["dense_ms"] > 0 and row["sddmm_ms"] > 0 and row["sddmm_max_rel_err"] < 1e-5
    assert {"before", "after"} <= set(record["load_average"]) and record["torch"]
