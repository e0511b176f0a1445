"""The step-time benchmarks run end to end (a smoke run: tiny model, one repeat; numbers are not checked here)."""

import json
import subprocess
import sys
from pathlib import Path


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
