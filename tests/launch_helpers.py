"""How the multi-process tests launch their workers: one environment (offline, one thread, this checkout on the
import path, no inherited rank variables) and one runner that shows the worker's stderr when it fails."""

import os
import subprocess
from pathlib import Path


def launch_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", WANDB_DISABLED="true",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
        **extra,
    )  # fmt: skip
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return env


def run_launch(cmd: list, out: Path, timeout: int = 240, **extra_env: str) -> Path:
    """Run ``cmd`` (a launcher line) with ``out`` created for its results; raise with its stderr on failure."""
    out.mkdir()
    proc = subprocess.run(cmd, env=launch_env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    return out
