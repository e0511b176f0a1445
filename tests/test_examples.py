"""Every script in examples/ runs end to end on the real model in its --smoke mode (a few prompts and steps) and
writes a result JSON whose metrics are fractions in [0, 1].

They need the converted real model (``make real-model``; the folder is ``$HF_ALIGN_REAL_MODEL`` or the cache
location): without it they skip, except under CI (``CI=true``), where a missing model is a failure. Together
about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
EXPECTED_METRICS = {
    "allo_masked_dpo": {"held_out_reward_before", "full_dpo", "lora_r8_dpo", "allo_masked_dpo"},
    "npo_unlearning": {"forget_rate", "retain_set_accuracy", "held_out_fact_accuracy"},
    "aligner_style": {
        f"{measure}_{name}"
        for measure in ("style_rate", "fact_accuracy")
        for name in ("before", "aligner_n1", "aligner_n10", "lora_r8", "llama_adapter")
    },
    "ama_merge": {
        f"{measure}_{name}"
        for measure in ("reward", "knowledge")
        for name in ("base", "aligned", "linear_0.5", "partwise", "adaptive")
    },
    "quark_feedback": {
        "held_out_reward_before", "held_out_reward_best_bin", "held_out_reward_worst_bin",
        "held_out_reward_unconditioned",
    },
}  # fmt: skip


def _real_model_dir() -> Path:
    from hf_align.testbed import real_model

    folder = real_model.model_dir()
    if not (folder / "model.safetensors").is_file():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{folder} holds no converted model: CI must run `make real-model` first")
        pytest.skip(f"the real model is not converted at {folder} (make real-model)")
    return folder


def test_every_example_is_tested():
    assert {p.stem for p in (ROOT / "examples").glob("*.py")} - {"real_task"} == set(EXPECTED_METRICS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_METRICS))
def test_example_smoke_run_writes_its_result(name, tmp_path):
    folder = _real_model_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--smoke", "--model", str(folder)]
    run = subprocess.run(
        [*command, "--output_dir", str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.smoke.json").read_text())
    assert {"example", "smoke", "seed", "metrics", "config", "seconds", "threads", "load_average_1min"} <= set(result)
    assert (result["example"], result["smoke"]) == (name, True)
    assert set(result["metrics"]) == EXPECTED_METRICS[name]
    for key, value in result["metrics"].items():
        assert isinstance(value, float | int) and math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)
