"""``python -m benchmarks.gpu --tiny``, the CPU smoke run of the GPU readiness script: every configuration runs and reports."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_tiny_runs_every_configuration(tmp_path):
    out = tmp_path / "gpu_tiny.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--tiny", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["config"]: row for row in report["results"]}
    errors = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert errors == {}
    expected = {
        "dpo_full", "dpo_lora_r16", "masked_row10", "masked_element10", "masked_row10_fp32deltas",
        "masked_element10_fp32deltas", "masked_row10_4bit", "npo_token", "sft_aligner_n1", "sft_aligner_n10",
        "sft_lora_r16", "merge_1gb",
    }  # fmt: skip
    assert set(rows) == expected
    for name, row in rows.items():
        if name != "merge_1gb":
            assert row["step_time_s"] > 0 and row["peak_memory_bytes"] > 0 and row["trainable_params"] > 0, name
    assert rows["masked_row10"]["trainable_params"] < rows["dpo_full"]["trainable_params"] / 5
    assert rows["sft_aligner_n1"]["trainable_params"] < rows["sft_aligner_n10"]["trainable_params"]
    assert rows["masked_row10"]["step_time_vs_dpo_full"] > 0 and "torch" in report["machine"]
