"""`hf-align pipeline`: ALLO's stages on the testbed, skip-when-complete, resume after a kill, clear recipe errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_align.cli import main
from hf_align.cli.pipeline import stage_commands
from hf_align.scripts.pipeline import STAGE_FILE, load_pipeline


ROOT = Path(__file__).resolve().parents[1]
ALLO = ROOT / "recipes" / "allo"
TINY = [
    "max_steps=4", "per_device_train_batch_size=2", "bf16=false", "use_cpu=true", "report_to=none",
    "gradient_checkpointing=false", "max_length=64", "disable_tqdm=true", "logging_steps=1",
    "save_strategy=steps", "save_steps=2", "num_train_epochs=1", "warmup_steps=0", "dataloader_num_workers=0",
]  # fmt: skip


def _testbed_pipeline(tmp_path: Path) -> Path:
    """The shipped testbed form of the ALLO pipeline (the stage recipes are the real-model ones)."""
    return ALLO / "pipeline_testbed.yaml"


def _argv(recipe: Path, out: Path) -> list[str]:
    argv = [
        "pipeline",
        "--config",
        str(recipe),
        "--output_dir",
        str(out),
        "--model_name_or_path",
        "testbed",
        "--no_launch",
    ]
    for item in TINY:
        argv += ["--set", item]
    return argv


@pytest.mark.parametrize("name", ["pipeline.yaml", "pipeline_testbed.yaml"])
def test_shipped_recipe_is_a_valid_pipeline(name):
    recipe = load_pipeline(ALLO / name, stage_commands().names)
    names = [stage["name"] for stage in recipe["stages"]]
    assert names == ["warmup", "mask_forget", "mask_improve", "labels", "forget", "improve"]


def test_allo_pipeline_runs_skips_and_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    recipe = _testbed_pipeline(tmp_path)
    straight = tmp_path / "straight"
    assert main(_argv(recipe, straight)) == 0
    out = capsys.readouterr().out
    for stage in ("warmup", "mask_forget", "mask_improve", "labels", "forget", "improve"):
        assert f"{stage} " in out  # summary table row
        assert '"status": "complete"' in (straight / stage / STAGE_FILE).read_text()
    assert (straight / "mask_improve" / "neuron_mask.safetensors").exists()
    final = load_file(straight / "improve" / "model.safetensors")

    # Re-running is a no-op: every stage is skipped and nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()}
    assert main(_argv(recipe, straight)) == 0
    assert capsys.readouterr().out.count("skipped (complete)") == 6
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()} == before

    # Kill the improving stage right after its first checkpoint, then run again: same final weights.
    import transformers

    original = transformers.Trainer._save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.args.output_dir.endswith("improve"):
            raise Killed

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(_argv(recipe, interrupted))
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", original)
    assert '"status": "running"' in (interrupted / "improve" / STAGE_FILE).read_text()
    assert main(_argv(recipe, interrupted)) == 0
    assert "resumed from checkpoint-2" in capsys.readouterr().out
    resumed = load_file(interrupted / "improve" / "model.safetensors")
    assert resumed.keys() == final.keys()
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: []\n", "`stages` must be a non-empty list"),
        ("stages:\n  - {name: a, command: dpo-typo}\n", "unknown command 'dpo-typo'"),
        (
            "stages:\n  - {name: a, command: select-mask, args: {neuron_scores_path: '{warm}'}}\n",
            "{warm} does not name",
        ),
        ("stagse: []\n", "unknown key(s) ['stagse']"),
        ("stages:\n  - {name: a, command: npo, recipe: missing.yaml}\n", "recipe 'missing.yaml' not found"),
    ],
)
def test_bad_pipeline_recipes_fail_before_running(tmp_path, capsys, text, message):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(text)
    assert (
        main(["pipeline", "--config", str(recipe), "--output_dir", str(tmp_path / "o"), "--model_name_or_path", "x"])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _one_stage(tmp_path: Path, extra: str = "") -> Path:
    recipe = tmp_path / "p.yaml"
    recipe.write_text(
        "model_name_or_path: testbed\nstages:\n"
        "  - {name: train, command: masked-dpo, args: {dataset_name: 'testbed:preference'}}\n" + extra
    )
    return recipe


def _steps(directory: Path) -> int:
    return json.loads((directory / "trainer_state.json").read_text())["global_step"]


def test_a_completed_stage_whose_arguments_changed_runs_again(tmp_path, capsys):
    """`--set max_steps=...` used to reuse the old result silently; the marker keeps the resolved arguments."""
    recipe, out = _one_stage(tmp_path), tmp_path / "out"
    tiny = [a for item in TINY if not item.startswith(("max_steps", "save_")) for a in ("--set", item)]
    argv = ["pipeline", "--config", str(recipe), "--output_dir", str(out), *tiny, "--set", "save_strategy=no"]
    assert main([*argv, "--set", "max_steps=1"]) == 0
    assert _steps(out / "train") == 1
    assert "--max_steps" in json.loads((out / "train" / STAGE_FILE).read_text())["resolved_args"]
    assert main([*argv, "--set", "max_steps=2"]) == 0
    assert "re-running from scratch (its arguments changed)" in capsys.readouterr().out
    assert _steps(out / "train") == 2
    assert main([*argv, "--set", "max_steps=2"]) == 0
    assert "skipped (complete)" in capsys.readouterr().out
    assert main([*argv, "--set", "max_steps=2", "--force"]) == 0
    assert "re-running from scratch (--force)" in capsys.readouterr().out


def test_a_failed_pipeline_prints_the_summary_of_what_finished(tmp_path, capsys):
    extra = "  - {name: mask, command: select-mask, args: {neuron_scores_path: '{train}/no_scores_here', neuron_mask_ratio: 0.1}}\n"
    recipe, out = _one_stage(tmp_path, extra), tmp_path / "out"
    argv = [
        "pipeline",
        "--config",
        str(recipe),
        "--output_dir",
        str(out),
        "--set",
        "max_steps=1",
        "--set",
        "save_strategy=no",
    ]
    argv += [a for item in TINY if not item.startswith(("max_steps", "save_")) for a in ("--set", item)]
    assert main(argv) != 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines() if line.startswith(("train ", "mask "))]
    assert [row[:2] for row in rows] == [["train", "ran"], ["mask", "FAILED"]]
    assert "stage 'mask' (select-mask) failed" in captured.err


def test_set_reaches_one_stage_of_any_command(tmp_path):
    from hf_align.scripts.pipeline import stage_argv

    stage = {"name": "labels", "command": "select-mask", "args": {"neuron_scores_path": "s"}}
    outputs = {"labels": str(tmp_path / "labels")}
    overrides = {"labels.neuron_scores_path": "t", "x": "1"}
    argv = stage_argv(stage, tmp_path, outputs, {"bf16": "true"}, overrides)
    assert argv == ["--neuron_scores_path", "t", "--output_dir", str(tmp_path / "labels")]


@pytest.mark.slow  # ~30 s on 2 busy cores: two short trainings of the testbed model
def test_kill_during_a_save_resumes_the_stage_from_its_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    """Issue 28: a kill while `checkpoint-4` is being written leaves it without `trainer_state.json`; the re-run
    resumes from `checkpoint-2` (steps 3 and 4 only), not from scratch, and ends at step 4."""
    import transformers

    recipe, out = _one_stage(tmp_path), tmp_path / "out"
    argv = ["pipeline", "--config", str(recipe), "--output_dir", str(out)]
    argv += [a for item in TINY for a in ("--set", item)]
    original = transformers.Trainer._save_checkpoint

    class Killed(Exception):
        pass

    def die_while_saving(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.global_step == 4:  # the Trainer writes trainer_state.json last: a kill just before it
            (Path(self.args.output_dir) / "checkpoint-4" / "trainer_state.json").unlink()
            raise Killed

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", die_while_saving)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", original)
    assert '"status": "running"' in (out / "train" / STAGE_FILE).read_text()

    steps = []
    training_step = transformers.Trainer.training_step
    monkeypatch.setattr(
        transformers.Trainer, "training_step", lambda self, *a, **k: steps.append(1) or training_step(self, *a, **k)
    )
    with pytest.warns(UserWarning, match="Skipping incomplete checkpoint .*checkpoint-4"):
        assert main(argv) == 0
    assert "resumed from checkpoint-2" in capsys.readouterr().out
    assert len(steps) == 2 and _steps(out / "train") == 4
    assert '"status": "complete"' in (out / "train" / STAGE_FILE).read_text()


@pytest.mark.parametrize("where", ["set", "args", "list"])
def test_a_mapping_in_a_recipe_reaches_the_stage_as_json(tmp_path, where):
    """A recipe's `set:` or a stage's `args:` holding a mapping (model_init_kwargs) or a list item that is one went
    to the stage as Python's repr ({'dtype': 'float32'}), which TrainingArguments' JSON reader refuses."""
    import json

    from hf_align.scripts.pipeline import plan, stage_argv
    from hf_align.trainers import MaskedDPOConfig

    value = {"dtype": "float32", "low_cpu_mem_usage": True}
    stage = {"name": "train", "command": "masked-dpo"}
    if where == "args":
        stage["args"] = {"model_init_kwargs": value}
    if where == "list":
        stage["args"] = {"report_to": [value]}
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model_name_or_path": "m",
                "stages": [stage],
                **({"set": {"model_init_kwargs": value}} if where == "set" else {}),
            }
        )
    )
    p = plan(recipe, {"masked-dpo"}, str(tmp_path / "out"), None, [])
    argv = stage_argv(stage, tmp_path, {"train": str(tmp_path / "out" / "train"), "model": "m"}, p.defaults, {}, True)
    if where == "list":
        assert json.loads(argv[argv.index("--report_to") + 1]) == value
        return
    text = argv[argv.index("--model_init_kwargs") + 1]
    assert json.loads(text) == value
    config = MaskedDPOConfig(
        output_dir=str(tmp_path / "o"), model_init_kwargs=text, report_to="none", use_cpu=True, bf16=False
    )
    assert config.model_init_kwargs == value
