"""Launch settings are honoured from every source (issue #28.9): the command line, the recipe, and an accelerate
config file. ``num_processes: 2`` in an accelerate config file on a CPU-only machine started ONE process (exit 0,
half the data per step); a config file that does not parse is one line."""

from __future__ import annotations

import pytest


ACCELERATE_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
use_cpu: true
"""


@pytest.mark.slow  # ~40 s each: two processes started through torchrun
@pytest.mark.parametrize("source", ["config_file", "recipe"])
def test_two_processes_from_a_file_start_two_processes(tmp_path, source):
    """Two processes × per-device batch 2 consume 4 rows a step: 2 steps over 8 rows is one epoch (one process: 0.5)."""
    import torch
    from launch_helpers import run_two_cpu_processes

    if torch.cuda.is_available():
        pytest.skip("the CPU launch path only applies where no GPU is visible")
    if source == "config_file":
        (tmp_path / "acc.yaml").write_text(ACCELERATE_CPU)
        launch = ["--config_file", str(tmp_path / "acc.yaml")]
    else:
        (tmp_path / "r.yaml").write_text("num_processes: 2\n")
        launch = ["--config", str(tmp_path / "r.yaml")]
    run = run_two_cpu_processes(tmp_path, *launch)
    assert "2 CPU processes" in run["stdout"]
    state = run["state"]
    assert state["epoch"] == pytest.approx(1.0)


def test_an_accelerate_config_that_does_not_parse_is_one_line(tmp_path, capsys):
    from hf_align.cli import main

    (tmp_path / "acc.yaml").write_text("distributed_type: [MULTI_CPU\n")
    argv = ["aligner-sft", "--config_file", str(tmp_path / "acc.yaml"), "--model_name_or_path", "testbed"]
    argv += ["--dataset_name", "testbed:sft", "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config_file" in err[0] and "line 2 column 1: not valid YAML" in err[0], err
    assert not (tmp_path / "o").exists()
