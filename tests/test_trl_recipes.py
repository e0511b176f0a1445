"""TRL users' recipes run unchanged: what `trl dpo` / `trl sft` run, hf-align's commands run (issue #17).

A TRL-only recipe (a `datasets:` mixture of json files, `test_split_size`, step evaluation) runs with TRL's own
`trl dpo` on the testbed model folder and with `hf-align masked-dpo`, and both log `eval_loss`; implicit-prompt
pairs (only `chosen`/`rejected`) train; `--load_in_4bit` trains a masked row delta on a 4-bit base on CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_align.cli import main
from hf_align.testbed import MODEL_DIR, preference_dataset, sft_dataset


ROOT = Path(__file__).resolve().parents[1]
TRL = Path(sys.executable).parent / "trl"
TINY = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "learning_rate": 1.0e-4,
    "max_length": 32,
    "use_cpu": True,
    "report_to": "none",
    "logging_steps": 1,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "save_strategy": "no",
}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _pairs(n: int = 16, implicit: bool = False) -> list[dict]:
    rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in preference_dataset().select(range(n))]
    if implicit:  # TRL's implicit prompt: the shared start of chosen and rejected
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    return rows


def _trl_dpo_recipe(tmp_path: Path, output_dir: Path) -> Path:
    """A recipe as a TRL user writes it for `trl dpo`: only TRL fields, a mixture of two json files."""
    first = _jsonl(tmp_path / "a.jsonl", _pairs(12))
    second = _jsonl(tmp_path / "b.jsonl", _pairs(24)[12:])
    recipe = {
        "model_name_or_path": str(MODEL_DIR),
        "datasets": [
            {"path": "json", "data_files": first, "split": "train"},
            {"path": "json", "data_files": second, "split": "train"},
        ],
        "test_split_size": 0.25,
        "eval_strategy": "steps",
        "eval_steps": 1,
        "output_dir": str(output_dir),
        **TINY,
    }
    path = tmp_path / "trl_dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _eval_losses(log_history: list[dict]) -> list[float]:
    return [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]


@pytest.mark.skipif(not TRL.exists(), reason="TRL's console script is not installed next to this Python")
def test_trl_recipe_with_mixture_test_split_and_step_eval_runs_with_trl_dpo_and_masked_dpo(tmp_path):
    trl_out, ours_out = tmp_path / "trl", tmp_path / "ours"
    recipe = _trl_dpo_recipe(tmp_path, trl_out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    # TRL's script does not save the trainer state; a checkpoint at the last step holds the log history.
    command = [str(TRL), "dpo", "--config", str(recipe), "--save_strategy", "steps", "--save_steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trl_state = json.loads((trl_out / "checkpoint-2" / "trainer_state.json").read_text())
    assert len(_eval_losses(trl_state["log_history"])) == 2

    for command in ("masked-dpo", "warmup-dpo"):
        assert main([command, "--config", str(recipe), "--output_dir", str(ours_out / command)]) == 0
        ours = json.loads((ours_out / command / "trainer_state.json").read_text())
        assert len(_eval_losses(ours["log_history"])) == 2, command


@pytest.mark.parametrize("command", ["warmup-dpo", "masked-dpo"])
def test_implicit_prompt_pairs_train_through_the_cli(tmp_path, command):
    data = _jsonl(tmp_path / "pairs.jsonl", _pairs(8, implicit=True))
    out = tmp_path / "out"
    argv = [command, "--model_name_or_path", "testbed", "--dataset_name", data, "--output_dir", str(out)]
    argv += [f"--{key}={value}" for key, value in TINY.items()]
    assert main(argv) == 0
    assert (out / "trainer_state.json").exists()


def _trl_sft_recipe(tmp_path: Path) -> dict:
    rows = [dict(row) for row in sft_dataset().select(range(16))]
    data = _jsonl(tmp_path / "sft.jsonl", rows)
    return {
        "model_name_or_path": str(MODEL_DIR),
        "datasets": [{"path": "json", "data_files": data, "split": "train", "columns": ["prompt", "completion"]}],
        "test_split_size": 0.25,
        "eval_strategy": "steps",
        "eval_steps": 2,
        **TINY,
    }


@pytest.mark.parametrize("command", ["aligner-sft", "npo"])
def test_trl_sft_recipe_runs_with_aligner_sft_and_npo(tmp_path, command):
    recipe = {**_trl_sft_recipe(tmp_path), "output_dir": str(tmp_path / "out")}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([command, "--config", str(path)]) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert _eval_losses(state["log_history"])


def test_eval_without_a_test_split_is_one_clear_line(tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    argv = ["masked-dpo", "--model_name_or_path", "testbed", "--dataset_name", data]
    argv += [
        "--output_dir",
        str(tmp_path / "out"),
        "--eval_strategy",
        "steps",
        *(f"--{k}={v}" for k, v in TINY.items()),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split 'test' not found" in err and "test_split_size" in err


def test_load_in_4bit_trains_a_masked_row_delta_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from hf_align import testbed
    from hf_align.masks import NeuronMask

    mask = tmp_path / "mask"
    NeuronMask.random(testbed.load().model, 0.1, granularity="row", seed=0).save(mask)
    out = tmp_path / "out"
    argv = ["masked-dpo", "--model_name_or_path", "testbed", "--dataset_name", "testbed:preference"]
    argv += ["--neuron_mask_path", str(mask), "--load_in_4bit", "--save_merged", "false", "--output_dir", str(out)]
    argv += [f"--{key}={value}" for key, value in TINY.items()]
    assert main(argv) == 0
    deltas = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    assert deltas, sorted(p.name for p in out.iterdir())
    assert any(t.abs().sum() > 0 for p in deltas for t in load_file(p).values())


def test_shipped_dpo_baseline_uses_only_trl_fields():
    """Our TRL-only recipe parses with `trl dpo`'s own parser, every key a TRL field (so `trl dpo` runs it too)."""
    from trl.scripts.dpo import make_parser

    path = ROOT / "recipes" / "baselines" / "dpo.yaml"
    *_, config_remaining, _ = make_parser().parse_args_and_config(
        ["--config", str(path), "--bf16", "false"], return_remaining_strings=True, separate_remaining_strings=True
    )
    assert config_remaining == []


def test_dataset_streaming_streams_the_data(tmp_path, monkeypatch):
    """`dataset_streaming` used to be parsed and ignored; the trainer now gets an IterableDataset."""
    from hf_align.trainers import MaskedDPOTrainer

    seen = {}
    original = MaskedDPOTrainer.__init__

    def spy(self, *args, **kwargs):
        seen["train"] = type(kwargs["train_dataset"]).__name__
        original(self, *args, **kwargs)

    monkeypatch.setattr(MaskedDPOTrainer, "__init__", spy)
    data = _jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    argv = ["masked-dpo", "--model_name_or_path", "testbed", "--dataset_name", data, "--dataset_streaming", "true"]
    argv += ["--output_dir", str(tmp_path / "out"), *(f"--{key}={value}" for key, value in TINY.items())]
    assert main(argv) == 0
    assert seen["train"] == "IterableDataset"
