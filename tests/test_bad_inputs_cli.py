"""The CLI's bad inputs, each one pinned: nothing a user made is lost, nothing runs that the command line did not
ask for, a crash leaves nothing a later run trusts, and every mistake is one line on stderr with exit code 2.

Commands are called in-process through ``hf_align.cli.main`` (what the console script runs); where the command
would train, its ``run`` is replaced so the test stays cheap: each refusal must happen before it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_align.cli import main
from hf_align.scripts.pipeline import STAGE_FILE


ROOT = Path(__file__).resolve().parents[1]
DEBUG_ENV = "HF_ALIGN_DEBUG"  # spelled out (not imported) so that each test fails for its own reason without the fix
PARAM = "model.layers.0.mlp.down_proj.weight"


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _scores(tmp_path: Path) -> Path:
    from hf_align.scores import save_scores

    directory = tmp_path / "scores"
    save_scores(directory, {PARAM: torch.arange(12, dtype=torch.float32).reshape(4, 3)}, {"method": "test"})
    return directory


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """masked-dpo's `run` records its parsed arguments instead of loading a model and training."""
    import hf_align.scripts.train as training

    calls = []

    def record(name, script_args, training_args, model_args, *more):
        calls.append(training_args)
        return 0

    monkeypatch.setattr(training, "run", record)
    return calls


def _training_argv(tmp_path: Path, recipe: dict | None = None, *extra: str) -> list[str]:
    argv = ["masked-dpo", "--no_launch", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    argv += ["--use_cpu", "true", "--bf16", "false"]
    argv += ["--model_name_or_path", "testbed", "--dataset_name", "testbed:preference"]
    if recipe is not None:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        argv += ["--config", str(path)]
    return argv + list(extra)


# ------------------------------------------------------------------ 1. never destroy what we did not create
def _pipeline(tmp_path: Path, stages: list[dict], **top) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, **top}))
    return path


def _run_pipeline(recipe: Path, out: Path, *extra: str) -> int:
    return main(
        ["pipeline", "--config", str(recipe), "--output_dir", str(out), "--model_name_or_path", "testbed", *extra]
    )


def test_pipeline_refuses_a_stage_folder_it_did_not_write(tmp_path, capsys):
    recipe = _pipeline(
        tmp_path,
        [{"name": "mask", "command": "select-mask", "args": {"neuron_scores_path": "x", "neuron_mask_ratio": 0.5}}],
    )
    mine = tmp_path / "out" / "mask"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own work")
    assert _run_pipeline(recipe, tmp_path / "out") == 2
    line = _one_line(capsys.readouterr().err)
    assert str(mine) in line and STAGE_FILE in line
    assert (mine / "notes.txt").read_text() == "my own work"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_pipeline_redoes_its_own_interrupted_selection(tmp_path, capsys):
    """A folder with the pipeline's own `running` marker is the pipeline's: it is redone from scratch."""
    scores = _scores(tmp_path)
    recipe = _pipeline(
        tmp_path,
        [
            {
                "name": "mask",
                "command": "select-mask",
                "args": {"neuron_scores_path": str(scores), "neuron_mask_ratio": 0.5},
            }
        ],
    )
    ours = tmp_path / "out" / "mask"
    ours.mkdir(parents=True)
    (ours / STAGE_FILE).write_text(json.dumps({"status": "running"}))
    (ours / "neuron_mask.json").write_text("half-written")
    assert _run_pipeline(recipe, tmp_path / "out") == 0
    assert json.loads((ours / STAGE_FILE).read_text())["status"] == "complete"
    assert (ours / "neuron_mask.safetensors").exists()


# The pipeline's lock is every command's lock now: tests/test_outputs.py (held by another process, stale).


def test_select_mask_refuses_to_replace_a_mask_without_overwrite(tmp_path, capsys):
    scores, out = _scores(tmp_path), tmp_path / "mask"
    argv = ["select-mask", "--neuron_scores_path", str(scores), "--output_dir", str(out)]
    assert main([*argv, "--neuron_mask_ratio", "0.5"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--neuron_mask_ratio", "0.25"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--overwrite" in line and str(out) in line and "overwrite=True" not in line
    assert _snapshot(out) == before
    assert main([*argv, "--neuron_mask_ratio", "0.25", "--overwrite"]) == 0
    assert _snapshot(out) != before


def test_select_mask_writes_beside_other_files_it_does_not_own(tmp_path):
    """Only the files select-mask writes count as a clash; a folder holding the user's notes is fine."""
    out = tmp_path / "mask"
    out.mkdir()
    (out / "README.md").write_text("notes")
    argv = ["select-mask", "--neuron_scores_path", str(_scores(tmp_path)), "--neuron_mask_ratio", "0.5"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    assert (out / "README.md").read_text() == "notes" and (out / "neuron_mask.safetensors").exists()


def test_quickstart_refuses_a_non_empty_output_dir_before_loading_anything(tmp_path, capsys, monkeypatch):
    import hf_align.testbed

    monkeypatch.setattr(hf_align.testbed, "load", lambda *a, **k: pytest.fail("loaded the model before checking"))
    (tmp_path / "model.safetensors").write_text("a user's model")
    assert main(["quickstart", "--output_dir", str(tmp_path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--output_dir" in line and "--overwrite" in line and str(tmp_path) in line
    assert (tmp_path / "model.safetensors").read_text() == "a user's model"


# -------------------------------------------------------- 2. a crash never leaves something a later run trusts
def _checkpoints(out: Path) -> None:
    """checkpoint-2 complete; checkpoint-4 killed after the model, before trainer_state.json."""
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "config.json").write_text("{}")
    (out / "checkpoint-6").mkdir()  # killed right after mkdir
    (out / "checkpoint-8").mkdir()  # killed while writing trainer_state.json (transformers writes it in place)
    (out / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')


def test_resume_true_skips_incomplete_checkpoints_and_names_them(tmp_path, no_training):
    _checkpoints(tmp_path / "out")
    with pytest.warns(UserWarning, match="checkpoint-8") as record:
        assert main(_training_argv(tmp_path, None, "--resume_from_checkpoint", "true")) == 0
    skipped = [str(w.message) for w in record if "Skipping incomplete" in str(w.message)]
    assert [n for n in ("checkpoint-8", "checkpoint-6", "checkpoint-4") if any(n in m for m in skipped)] == [
        "checkpoint-8",
        "checkpoint-6",
        "checkpoint-4",
    ]
    assert no_training[0].resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-2")


def test_resume_from_an_incomplete_checkpoint_is_refused_before_loading(tmp_path, capsys, no_training):
    _checkpoints(tmp_path / "out")
    target = tmp_path / "out" / "checkpoint-4"
    assert main(_training_argv(tmp_path, None, "--resume_from_checkpoint", str(target))) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(target) in line and "trainer_state.json" in line and "resume_from_checkpoint" in line
    assert no_training == []


def test_resume_true_without_a_complete_checkpoint_is_refused(tmp_path, capsys, no_training):
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    with pytest.warns(UserWarning, match="checkpoint-3"):
        assert main(_training_argv(tmp_path, None, "--resume_from_checkpoint", "true")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "resume_from_checkpoint" in line and str(tmp_path / "out") in line
    assert no_training == []


def test_pipeline_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch):
    import hf_align.scripts.pipeline as pipeline

    recipe = _pipeline(tmp_path, [{"name": "train", "command": "masked-dpo"}])
    stage = tmp_path / "out" / "train"
    _checkpoints(stage)
    (stage / STAGE_FILE).write_text(json.dumps({"status": "running"}))
    argvs = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, argv, run: argvs.append(argv))
    with pytest.warns(UserWarning, match="checkpoint-4"):
        assert _run_pipeline(recipe, tmp_path / "out") == 0
    resume = argvs[0][argvs[0].index("--resume_from_checkpoint") + 1]
    assert resume == str(stage / "checkpoint-2")


# -------------------------------------------------------- 3. never run code the user did not explicitly ask for
VAR = "HF_ALIGN_TEST_RECIPE_ENV"


@pytest.mark.parametrize(
    ("recipe", "key", "flag"),
    [
        ({"env": {VAR: "set-by-the-recipe"}}, "`env`", "--allow_recipe_env"),
        ({"trust_remote_code": True}, "`trust_remote_code`", "--trust_remote_code"),
        ({"model_init_kwargs": {"trust_remote_code": True}}, "`model_init_kwargs.trust_remote_code`", "--trust_remote_code"),
    ],
)  # fmt: skip
def test_recipe_cannot_switch_on_env_or_remote_code(tmp_path, capsys, monkeypatch, no_training, recipe, key, flag):
    monkeypatch.delenv(VAR, raising=False)
    assert main(_training_argv(tmp_path, recipe)) == 2
    line = _one_line(capsys.readouterr().err)
    assert key in line and flag in line and "recipe.yaml" in line
    assert VAR not in os.environ and no_training == []


def test_command_line_flags_allow_what_the_recipe_asks(tmp_path, monkeypatch, no_training):
    monkeypatch.delenv(VAR, raising=False)
    recipe = {"env": {VAR: "yes"}, "model_init_kwargs": {"trust_remote_code": True}}
    assert main(_training_argv(tmp_path, recipe, "--allow_recipe_env", "--trust_remote_code")) == 0
    assert os.environ[VAR] == "yes"
    assert no_training[0].model_init_kwargs == {"trust_remote_code": True}
    assert no_training[0].trust_remote_code is True


@pytest.mark.parametrize(
    "where", [{"set": {"trust_remote_code": True}}, {"args": {"model_init_kwargs": '{"trust_remote_code": true}'}}]
)
def test_pipeline_recipe_cannot_switch_on_remote_code(tmp_path, capsys, monkeypatch, where):
    import hf_align.scripts.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_stage", lambda *a: pytest.fail("a stage ran"))
    stage = {"name": "train", "command": "masked-dpo", **({"args": where["args"]} if "args" in where else {})}
    recipe = _pipeline(tmp_path, [stage], **({"set": where["set"]} if "set" in where else {}))
    assert _run_pipeline(recipe, tmp_path / "out") == 2
    line = _one_line(capsys.readouterr().err)
    assert "trust_remote_code" in line and "--trust_remote_code" in line and "pipeline.yaml" in line
    assert not (tmp_path / "out").exists()


def test_pipeline_flags_reach_the_training_stages(tmp_path, monkeypatch):
    import hf_align.scripts.pipeline as pipeline

    argvs = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, argv, run: argvs.append(argv))
    recipe = _pipeline(tmp_path, [{"name": "train", "command": "masked-dpo", "args": {"trust_remote_code": True}}])
    assert _run_pipeline(recipe, tmp_path / "out", "--trust_remote_code", "--allow_recipe_env") == 0
    assert "--trust_remote_code" in argvs[0] and "--allow_recipe_env" in argvs[0]


def test_launched_processes_never_get_the_current_folder_on_sys_path(tmp_path, monkeypatch):
    """Same import rule in-process and under `accelerate launch`: `python -m` in the launched processes runs with
    PYTHONSAFEPATH=1, and the permission flags travel with the command line (the processes check again)."""
    import accelerate.commands.launch as launch

    from hf_align.cli.training import run_command

    seen = {}

    def fake_launch(args):
        seen["safe_path"] = os.environ.get("PYTHONSAFEPATH")
        seen["argv"] = list(args.training_script_args)

    monkeypatch.setattr(launch, "launch_command", fake_launch)
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    monkeypatch.delenv("HF_ALIGN_NO_LAUNCH", raising=False)
    argv = [a for a in _training_argv(tmp_path) if a != "--no_launch"] + ["--trust_remote_code", "--allow_recipe_env"]
    assert run_command("masked-dpo", [*argv, "--num_processes", "1"]) == 0  # a launch flag: in-process otherwise
    assert seen["safe_path"] == "1" and "PYTHONSAFEPATH" not in os.environ
    assert "--trust_remote_code" in seen["argv"] and "--allow_recipe_env" in seen["argv"]


# ---------------------------------------------------------------- 4. every CLI error is one line, exit code 2
def test_unknown_recipe_field_is_one_line_exit_2(tmp_path, capsys, no_training):
    assert main(_training_argv(tmp_path, {"learning_rat": 1e-3})) == 2
    line = _one_line(capsys.readouterr().err)
    assert "learning_rat" in line and "hf-align masked-dpo" in line


def test_missing_recipe_file_is_one_line_exit_2(tmp_path, capsys, no_training):
    assert main([*_training_argv(tmp_path), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert str(tmp_path / "nope.yaml") in _one_line(capsys.readouterr().err)


def test_bad_dataset_name_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = [a if a != "testbed:preference" else "testbed:nope" for a in _training_argv(tmp_path)]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("hf-align masked-dpo: dataset_name 'testbed:nope'")
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: --debug sets it for launched processes
    with pytest.raises(ValueError, match="testbed:nope"):
        main(["--debug", *argv])


def test_error_in_a_launched_process_is_one_line_exit_2(tmp_path):
    """The real console path: parent validates, `accelerate launch` starts the child, the child's error is one
    line and its exit code 2 comes back from the parent."""
    cmd = [sys.executable, "-m", "hf_align.cli", *(a for a in _training_argv(tmp_path) if a != "--no_launch")]
    cmd += ["--cpu", "--num_processes", "1"]
    cmd[cmd.index("testbed:preference")] = "testbed:nope"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    env.pop("HF_ALIGN_NO_LAUNCH", None)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "hf-align masked-dpo: dataset_name 'testbed:nope'" in result.stderr


def test_the_current_folder_is_not_on_the_import_path_of_python_m_hf_align_cli(tmp_path):
    """`python -m` puts the current folder first on sys.path; a `module:function` (here label-tokens' --method)
    must come from installed packages or an explicit PYTHONPATH, as under `accelerate launch` (PYTHONSAFEPATH)."""
    (tmp_path / "probe_in_cwd.py").write_text(
        "from pathlib import Path\nPath('imported').write_text('ran')\ndef label(*a, **k):\n    raise ValueError('probe')\n"
    )
    cmd = [sys.executable, "-m", "hf_align.cli", "label-tokens", "--dataset_name", "testbed:preference"]
    cmd += ["--model_name_or_path", "testbed", "--method", "probe_in_cwd:label", "--output_file", "out.jsonl"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--method 'probe_in_cwd:label'" in _one_line(result.stderr)
    assert not (tmp_path / "imported").exists() and not (tmp_path / "out.jsonl").exists()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)  # asked for explicitly: imported
    subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert (tmp_path / "imported").read_text() == "ran"


def test_adaptive_merge_recipe_env_needs_the_flag_too(tmp_path, capsys, monkeypatch):
    """adaptive-merge parses its recipe with the same TrlParser: the same gate, before TRL applies `env:`."""
    monkeypatch.delenv(VAR, raising=False)
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({"env": {VAR: "x"}, "output_dir": str(tmp_path / "out")}))
    assert main(["adaptive-merge", "--config", str(recipe)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "`env`" in line and "--allow_recipe_env" in line and str(recipe) in line
    assert VAR not in os.environ and not (tmp_path / "out").exists()


def test_merge_refuses_an_existing_output_naming_the_flag(tmp_path, capsys):

    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("the user's notes")
    argv = [
        "merge",
        "--base_model_name_or_path",
        "testbed",
        "--model_name_or_path",
        "testbed",
        "--output_dir",
        str(out),
    ]
    assert main([*argv, "--alpha", "0.3", "--disable_tqdm"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--output_dir" in line and "--overwrite" in line and str(out) in line and "overwrite=True" not in line
    assert (out / "mine.txt").read_text() == "the user's notes" and sorted(p.name for p in out.iterdir()) == [
        "mine.txt"
    ]


def test_adaptive_merge_refuses_an_existing_merged_output_naming_the_flag(tmp_path, capsys):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "mine.txt").write_text("keep")
    argv = [
        "adaptive-merge", "--model_name_or_path", "testbed", "--base_model_name_or_path", "testbed",
        "--dataset_name", "testbed:sft", "--output_dir", str(tmp_path / "out"), "--merged_output_dir", str(merged),
        "--use_cpu", "true", "--report_to", "none",
    ]  # fmt: skip
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--merged_output_dir" in line and "--overwrite" in line and str(merged) in line
    assert (merged / "mine.txt").read_text() == "keep" and not (tmp_path / "out").exists()


def test_eval_refuses_to_replace_a_results_file_naming_the_flag(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text('{"mine": 1}')
    argv = [
        "eval",
        "--model_name_or_path",
        "testbed",
        "--dataset_name",
        "testbed:prompts",
        "--output_file",
        str(results),
    ]
    assert main([*argv, "--num_prompts", "2", "--max_new_tokens", "2", "--disable_tqdm"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--output_file" in line and "--overwrite" in line and str(results) in line
    assert results.read_text() == '{"mine": 1}'
