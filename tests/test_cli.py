"""The ``hf-align`` entry point: help, version, env, dispatch, and the accelerate launch path."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_align import __version__
from hf_align.cli import COMMANDS, all_commands, main


def test_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in all_commands():
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
    assert f"- hf_align: {__version__}" in out and "- cuda_available:" in out


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
    from launch_helpers import run_two_cpu_processes

    run = run_two_cpu_processes(tmp_path, "--num_processes", "2")
    assert "2 CPU processes" in run["stdout"]
    state = run["state"]
    assert state["epoch"] == pytest.approx(1.0)


def test_env_shows_what_trl_env_shows(capsys):
    from trl.scripts.env import print_env

    print_env()
    trl_keys = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("- ")]
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in (*trl_keys, "- logging"):
        assert f"{key}: " in out, key


def test_training_help_names_hf_align_fields_and_launch_flags(capsys):
    assert main(["masked-dpo", "--help"]) == 0
    out = capsys.readouterr().out
    own = next(line for line in out.splitlines() if line.startswith("hf-align's own fields:"))
    assert "neuron_mask_path" in own and "learning_rate" not in own
    assert "--neuron_mask_path" in out and "--learning_rate" in out and "--config RECIPE.yaml" in out
    assert out.index("launch flags (") > out.index("--learning_rate") and "--num_processes N" in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_help_and_a_config_recipe(command, capsys, tmp_path):
    """One parser for all: `--help` lists the fields, `--config` is accepted, an unknown key is one line."""
    assert main([command, "--help"]) == 0
    assert "--config" in capsys.readouterr().out
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("no_such_field: 1\n")
    argv = [command, "--config", str(recipe)] if command != "pipeline" else [command, "--no_such_field", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_field" in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize(
    ("command", "old", "new"),
    [
        ("select-mask", ["--scores", "S", "--ratio", "0.5", "--exclude-top", "0.1", "--output", "O"],
         ["--neuron_scores_path", "S", "--neuron_mask_ratio", "0.5", "--neuron_mask_exclude_top", "0.1", "--output_dir", "O"]),
        ("merge", ["--base", "B", "--aligned", "A", "--output", "O", "--alpha", "0.2"],
         ["--base_model_name_or_path", "B", "--model_name_or_path", "A", "--output_dir", "O", "--alpha", "0.2"]),
        ("label-tokens", ["--dataset", "D", "--tokenizer", "T", "--output", "O.jsonl", "--split", "s"],
         ["--dataset_name", "D", "--model_name_or_path", "T", "--output_file", "O.jsonl", "--dataset_split", "s"]),
        ("eval", ["--model_name_or_path", "M", "--dataset_name", "D", "--output", "O", "--retain_dataset", "R",
                  "--retain_split", "s", "--reward", "a", "--reward", "b"],
         ["--model_name_or_path", "M", "--dataset_name", "D", "--output_file", "O", "--retain_dataset_name", "R",
          "--retain_dataset_split", "s", "--reward", "a", "b"]),
        ("warmup-dpo", ["--select_ratio", "0.1", "--select_scope", "tensor", "--select_exclude_top", "0.01"],
         ["--neuron_mask_ratio", "0.1", "--neuron_mask_scope", "tensor", "--neuron_mask_exclude_top", "0.01"]),
    ],
)  # fmt: skip
def test_old_spellings_parse_as_the_new_ones_with_one_warning_line_each(command, old, new, capsys):
    from hf_align.cli import training
    from hf_align.cli.common import CommandParser

    if command in COMMANDS:
        module = importlib.import_module(f"hf_align.cli.{COMMANDS[command][0]}")
        types = tuple(t for t in vars(module).values() if isinstance(t, type) and t.__module__ == module.__name__
                      and dataclasses.is_dataclass(t))  # fmt: skip
        parser = CommandParser(types, f"hf-align {command}", renamed=module.RENAMED)
    else:
        parser = training.make_parser(command)
        tail = ["--output_dir", "o", "--use_cpu", "true", "--bf16", "false"]
        old, new = [*old, *tail], [*new, *tail]
    capsys.readouterr()
    parsed_old = parser.parse(old)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert parsed_old == parser.parse(new)
    renamed = [a for a in old if a.startswith("--") and a not in new and a != "--reward"]
    assert len(warnings) == len(renamed) and all("FutureWarning" in w and "deprecated" in w for w in warnings)
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    for flag in renamed:
        assert f"`{command} {flag}`" in changelog, flag


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from hf_align.cli import env
    from hf_align.errors import UserError

    monkeypatch.setattr(env, "collect", lambda: (_ for _ in ()).throw(UserError("field x: expected y")))
    assert main(["env"]) == 2
    assert capsys.readouterr().err.strip() == "hf-align env: field x: expected y"
    monkeypatch.setattr(env, "collect", lambda: {}.update(1))  # a genuine bug: TypeError
    with pytest.raises(TypeError):
        main(["env"])
    monkeypatch.setattr(env, "collect", lambda: int("not a number"))  # a bug's plain ValueError: not a user error
    with pytest.raises(ValueError, match="invalid literal"):
        main(["env"])


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


def test_cli_uses_no_argparse_private_names():
    import re

    sources = (Path(__file__).resolve().parents[1] / "hf_align" / "cli").glob("*.py")
    private = re.compile(r"\._(option_string_actions|actions|action_groups|get_formatter|registries)\b")
    assert not [str(path) for path in sources if private.search(path.read_text())]


def test_every_registered_trainer_is_a_command_and_masked_kto_trains(tmp_path):
    """The training commands are the registry's entries; the newest one runs from the command line unchanged."""
    from hf_align.trainers.registry import TRAINERS

    assert set(TRAINERS) <= set(all_commands())
    data = tmp_path / "kto.jsonl"
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1) if i % 2 else "x", "label": bool(i % 2)} for i in range(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["masked-kto", "--model_name_or_path", "testbed", "--dataset_name", str(data), "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "4", "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    assert main([*argv, "--save_strategy", "no", "--output_dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
