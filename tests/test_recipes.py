"""Every recipe in recipes/ runs against the testbed with tiny overrides, so a recipe can't rot.

A recipe names its command in its first line: ``# command: hf-align <command>``.
"""

import re
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
HEADER = re.compile(r"^# command: hf-align (?P<command>[a-z-]+)\s*$")

# Testbed stand-ins for each training command's model and data, and a 2-step budget.
TINY_TRAINING = [
    "--model_name_or_path", "testbed",
    "--max_steps", "2",
    "--per_device_train_batch_size", "2",
    "--gradient_accumulation_steps", "1",
    "--bf16", "false",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
    "--dataloader_num_workers", "0",
]  # fmt: skip
TESTBED_DATA = {
    "masked-dpo": "testbed:preference",
    "warmup-dpo": "testbed:preference",
    "aligner-dpo": "testbed:preference",
    "aligner-sft": "testbed:sft",
    "npo": "testbed:forget",
    "feedback": "testbed:prompts",
}
# Command-specific stand-ins: the feedback loop runs num_rounds × steps_per_round steps (= max_steps 2).
TINY_EXTRA = {
    "feedback": [
        "--num_rounds", "1",
        "--steps_per_round", "2",
        "--prompts_per_round", "4",
        "--num_generations", "2",
        "--max_completion_length", "4",
        "--generation_batch_size", "8",
    ],
}  # fmt: skip

# Judges for the category / text recipes (they name none: a judge is the user's), by the testbed's reward.
JUDGES = """
from hf_align.testbed import reward


def category(prompts, completions):
    return ["Correct." if r == 1.0 else "Partly correct." if r > 0 else "Wrong." for r in reward(prompts, completions)]


def text(prompts, completions):
    return [(f"{round(100 * r)}% of the digits are right.", r) for r in reward(prompts, completions)]
"""


def _testbed_mask(directory: Path, ratio: float = 0.1) -> str:
    """A random row mask for the testbed model, standing in for the mask a recipe's earlier stage writes."""
    from hf_align import testbed
    from hf_align.masks import NeuronMask

    NeuronMask.random(testbed.load().model, ratio, granularity="row", seed=0).save(directory)
    return str(directory)


def recipe_command(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    match = HEADER.match(first)
    assert match, f"{path}: first line must be '# command: hf-align <command>', got {first!r}"
    return match.group("command")


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_is_valid_yaml_with_a_known_command(path):
    from hf_align.cli import all_commands

    command = recipe_command(path)
    assert command in all_commands()
    assert isinstance(yaml.safe_load(path.read_text()), dict)


TRAINING_RECIPES = [p for p in RECIPES if recipe_command(p) in TESTBED_DATA]


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=[str(p.relative_to(ROOT)) for p in TRAINING_RECIPES])
def test_training_recipe_runs_on_the_testbed(path, tmp_path, monkeypatch):
    from hf_align.cli.training import run_command

    command = recipe_command(path)
    argv = ["--config", str(path), *TINY_TRAINING, "--dataset_name", TESTBED_DATA[command]]
    argv += ["--output_dir", str(tmp_path / "out")]
    argv += TINY_EXTRA.get(command, [])
    recipe = yaml.safe_load(path.read_text())
    if "neuron_mask_path" in recipe:
        argv += ["--neuron_mask_path", _testbed_mask(tmp_path / "mask")]
    if "feedback_fn" in recipe and recipe.get("feedback_type") in ("category", "text"):
        (tmp_path / "recipe_judges.py").write_text(JUDGES)
        monkeypatch.syspath_prepend(str(tmp_path))
        argv += ["--feedback_fn", f"recipe_judges:{recipe['feedback_type']}"]
    assert run_command(command, argv, launch=False) == 0
    assert (tmp_path / "out").exists()


def test_recipe_with_unknown_field_fails_before_training(tmp_path):
    from hf_align.cli.training import run_command

    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: testbed\ndataset_name: testbed:sft\nlearnin_rate: 1e-4\n")
    with pytest.raises(SystemExit, match="learnin_rate"):
        run_command(
            "aligner-sft",
            ["--config", str(bad), "--use_cpu", "true", "--output_dir", str(tmp_path / "o")],
            launch=False,
        )
    assert not (tmp_path / "o").exists()


def test_recipe_with_wrong_type_fails_before_training(tmp_path, capsys):
    from hf_align.cli.training import run_command

    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: testbed\ndataset_name: testbed:sft\naligner_num_tokens: many\n")
    from hf_align.errors import UserError

    with pytest.raises(UserError, match="aligner_num_tokens.*invalid int value: 'many'"):  # one line, not usage
        run_command(
            "aligner-sft",
            ["--config", str(bad), "--use_cpu", "true", "--output_dir", str(tmp_path / "o")],
            launch=False,
        )
    assert not (tmp_path / "o").exists()


def test_missing_dataset_column_is_named(tmp_path):
    """TRL's DPOTrainer would fail with a bare KeyError deep in ``datasets.map``; the command names what it needs."""
    from hf_align.cli.training import run_command

    argv = ["--model_name_or_path", "testbed", "--dataset_name", "testbed:sft", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"missing columns: expected chosen\+rejected; found columns \['prompt'"):
        run_command("aligner-dpo", [*argv, *TINY_TRAINING[2:]], launch=False)
