"""`hf-align pipeline`: ALLO's stages on the testbed, skip-when-complete, resume after a kill, clear recipe errors."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_align.cli import main
from hf_align.cli.pipeline import STAGE_FILE, load_pipeline


ROOT = Path(__file__).resolve().parents[1]
ALLO = ROOT / "recipes" / "allo"
TINY = [
    "max_steps=4", "per_device_train_batch_size=2", "bf16=false", "use_cpu=true", "report_to=none",
    "gradient_checkpointing=false", "max_length=64", "disable_tqdm=true", "logging_steps=1",
    "save_strategy=steps", "save_steps=2", "num_train_epochs=1", "warmup_steps=0", "dataloader_num_workers=0",
]  # fmt: skip


def _testbed_pipeline(tmp_path: Path) -> Path:
    """The shipped ALLO pipeline, its stages pointed at testbed data."""
    recipe = yaml.safe_load((ALLO / "pipeline.yaml").read_text())
    data = {
        "warmup": {"dataset_name": "testbed:preference", "score_method": "gradient", "score_granularity": "row"},
        "labels": {"dataset": "testbed:preference", "tokenizer": "testbed"},
        "improve": {"dataset_name": "testbed:preference"},
    }
    for stage in recipe["stages"]:
        if stage.get("recipe"):
            stage["recipe"] = str(ALLO / stage["recipe"])
        stage["args"] = {**(stage.get("args") or {}), **data.get(stage["name"], {})}
    path = tmp_path / "pipeline.yaml"
    path.write_text("# command: hf-align pipeline\n" + yaml.safe_dump(recipe))
    return path


def _argv(recipe: Path, out: Path) -> list[str]:
    argv = ["pipeline", str(recipe), "--output_dir", str(out), "--model_name_or_path", "testbed", "--no_launch"]
    for item in TINY:
        argv += ["--set", item]
    return argv


def test_shipped_recipe_is_a_valid_pipeline():
    recipe = load_pipeline(ALLO / "pipeline.yaml")
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
        ("stages:\n  - {name: a, command: select-mask, args: {scores: '{warm}'}}\n", "{warm} does not name"),
        ("stagse: []\n", "unknown key(s) ['stagse']"),
        ("stages:\n  - {name: a, command: npo, recipe: missing.yaml}\n", "recipe 'missing.yaml' not found"),
    ],
)
def test_bad_pipeline_recipes_fail_before_running(tmp_path, capsys, text, message):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(text)
    assert main(["pipeline", str(recipe), "--output_dir", str(tmp_path / "o"), "--model_name_or_path", "x"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
