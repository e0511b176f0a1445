"""The ``hf-align`` entry point: help, version, env, dispatch, and the accelerate launch path."""

import json
import os
import subprocess
import sys

import pytest

from hf_align import __version__
from hf_align.cli import COMMANDS, main
from hf_align.cli.training import TRAINING_COMMANDS


def test_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*COMMANDS, *TRAINING_COMMANDS]:
        assert any(line.strip().startswith(name + " ") for line in out.splitlines()), name


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-align {__version__}"


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_env_reports_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    import torch
    import trl

    assert f"- torch: {torch.__version__}" in out and f"- trl: {trl.__version__}" in out
    assert "- cuda_available:" in out


def test_training_command_runs_through_accelerate_launch(tmp_path):
    """The real path: `hf-align aligner-sft ...` validates, then re-runs itself under `accelerate launch`."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "hf_align.cli", "aligner-sft",
        "--cpu", "--num_processes", "1",
        "--model_name_or_path", "testbed", "--dataset_name", "testbed:sft",
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--bf16", "false",
        "--report_to", "none", "--save_strategy", "no", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_config.json").exists()


def test_num_processes_on_a_cpu_only_machine_starts_that_many_processes(tmp_path):
    """accelerate's CPU launcher starts ONE process without an MPI hostfile; hf-align starts them through torchrun.

    Two processes × per-device batch 2 consume 4 rows a step: 2 steps over 8 rows is one epoch (a single process
    would report 0.5).
    """
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU launch path only applies where no GPU is visible")
    out = tmp_path / "out"
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    cmd = [
        sys.executable, "-m", "hf_align.cli", "aligner-sft", "--num_processes", "2",
        "--model_name_or_path", "testbed", "--dataset_name", str(data),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--bf16", "false", "--report_to", "none",
        "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out), "--dataloader_num_workers", "0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 CPU processes" in result.stdout
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.0)


def test_env_shows_what_trl_env_shows(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("accelerate_config", "accelerator(s)", "bitsandbytes", "deepspeed", "liger_kernel", "vllm", "logging"):
        assert f"- {key}: " in out, key


def test_training_help_lists_hf_align_flags_first_then_launch_flags(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ALIGN_CACHE", str(tmp_path))
    assert main(["masked-dpo", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()

    def first(text):
        return next(i for i, line in enumerate(lines) if text in line)

    assert (
        first("hf-align options")
        < first("  --config RECIPE.yaml")
        < first("--neuron_mask_path")
        < first("launch flags (")
    )
    assert (
        first("launch flags (") < first("--num_processes") < first("ScriptArguments (TRL)") < first("--learning_rate")
    )
    assert first("--neuron_mask_path") < 60 and "DatasetMixtureConfig (TRL)" in out


@pytest.mark.parametrize(
    ("command", "snake", "kebab"),
    [("merge", "--no_progress", "--no-progress"), ("select-mask", "--exclude_top", "--exclude-top")],
)
def test_one_flag_spelling_with_the_old_one_as_hidden_alias(capsys, command, snake, kebab):
    import importlib

    from hf_align.cli import COMMANDS

    parser = importlib.import_module(f"hf_align.cli.{COMMANDS[command][0]}").build_parser()
    help_text = parser.format_help()
    assert snake in help_text and kebab not in help_text
    dest = snake.lstrip("-")
    assert parser._option_string_actions[kebab].dest == dest == parser._option_string_actions[snake].dest


def test_training_runs_in_this_process_without_launch_flags(tmp_path, monkeypatch, capsys):
    """No second Python for a plain run: `accelerate launch` is only used when a launch flag asks for it."""
    import accelerate.commands.launch as launch

    def no_launch(args):
        raise AssertionError("launched a child process")

    monkeypatch.setattr(launch, "launch_command", no_launch)
    monkeypatch.delenv("HF_ALIGN_NO_LAUNCH", raising=False)
    out = tmp_path / "out"
    argv = ["aligner-sft", "--model_name_or_path", "testbed", "--dataset_name", "testbed:sft", "--max_steps", "1"]
    argv += [
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    assert (out / "adapter_config.json").exists()
    # and a failure is one line, not two tracebacks
    assert main([*argv[:-1], str(tmp_path / "o2"), "--dataset_name", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-align aligner-sft: ")


def test_training_help_is_fast_the_second_time(tmp_path):
    """The help comes from a cache keyed by versions and sources: no torch / TRL import to print it again."""
    env = {**os.environ, "HF_ALIGN_CACHE": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys; from hf_align.cli import main; main(['npo', '--help']); print('torch' in sys.modules)"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert first.stdout.splitlines()[-1] == "True" and second.stdout.splitlines()[-1] == "False"
    assert first.stdout.removesuffix("True\n") == second.stdout.removesuffix("False\n")
    assert "--retain_dataset_name" in second.stdout


def test_label_tokens_speaks_snake_case_and_still_takes_the_old_spelling():
    from hf_align.cli.label_tokens import build_parser

    parser = build_parser()
    shown = parser.format_help()
    assert "--response_column" in shown and "--max_rows" in shown and "--response-column" not in shown
    base = ["--dataset", "x.jsonl", "--tokenizer", "t", "--output", "o.jsonl"]
    old = parser.parse_args([*base, "--response-column", "answer", "--max-rows", "3"])
    new = parser.parse_args([*base, "--response_column", "answer", "--max_rows", "3"])
    assert (old.response_column, old.max_rows) == (new.response_column, new.max_rows) == ("answer", 3)
