"""The commands that run TRL's own trainers (``aligner-sft``, ``aligner-dpo``, ``warmup-dpo``) keep hf-align's
guarantees (issue #28.11, #29.3): config checks, JSON training arguments and no pickle written or pushed, no local
base-model path in the adapter config or card, hf-align's card, the base model's dtype; the warm-up writes no model
copy nobody reads."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import safe_open

from hf_align.errors import UserError


TINY = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--max_steps", "1", "--save_strategy", "no"]
TINY += ["--per_device_train_batch_size", "2", "--max_length", "64", "--plots", "false"]
DATA = {"aligner-sft": "testbed:sft", "aligner-dpo": "testbed:preference", "warmup-dpo": "testbed:preference"}


class FakeHub:
    """``transformers``' ``hf_api()`` stand-in: records each upload's files (after the Trainer's ignore patterns)."""

    def __init__(self):
        self.uploads: list[tuple[str, dict[str, bytes]]] = []

    def create_repo(self, repo_id, **_):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **_):
        root = Path(folder_path)
        files = {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and not any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in ignore_patterns)
        }
        self.uploads.append((repo_id, files))


def _run(command: str, base: Path, out: Path, *extra: str) -> int:
    from hf_align.cli.training import run_command

    argv = ["--model_name_or_path", str(base), "--dataset_name", DATA[command], "--output_dir", str(out)]
    return run_command(command, [*argv, *TINY, *extra], launch=False)


@pytest.mark.parametrize("command", ["aligner-sft", "aligner-dpo"])
def test_aligner_commands_save_and_push_as_hf_align_does(bf16_tied_base, tmp_path, monkeypatch, command):
    """Fails on main: training_args.bin written and pushed, the local base path in adapter_config.json and the card
    (PEFT's empty template), adapter weights in float32."""
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    out = tmp_path / "out"
    assert _run(command, bf16_tied_base, out, "--push_to_hub", "true", "--hub_model_id", "me/aligned") == 0
    files = {p.name for p in out.iterdir()}
    assert "training_args.bin" not in files and "training_args.json" in files
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "ALIGNER" and adapter["base_model_name_or_path"] is None  # a local folder
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    card = (out / "README.md").read_text()
    assert "hf-align" in card and "aligner" in card and str(bf16_tied_base) not in card and str(tmp_path) not in card
    [(repo, pushed)] = hub.uploads
    assert repo == "me/aligned" and "training_args.bin" not in pushed and "training_args.json" in pushed
    for name in ("README.md", "adapter_config.json"):  # (training_args.json keeps output_dir: the run's record)
        assert str(tmp_path).encode() not in pushed[name]


@pytest.mark.parametrize(
    ("command", "flag", "value"), [("aligner-sft", "max_steps", "0"), ("aligner-dpo", "beta", "-0.1")]
)
def test_aligner_commands_get_hf_align_config_checks(bf16_tied_base, tmp_path, command, flag, value):
    """The same config checks as the other commands (kept: main already checked TRL configs at parse time)."""
    with pytest.raises(UserError, match=flag):
        _run(command, bf16_tied_base, tmp_path / "out", f"--{flag}", value)
    assert not (tmp_path / "out").exists()


def test_warmup_writes_its_scores_and_no_model_copy(bf16_tied_base, tmp_path):
    """Fails on main: the warm-up's final save wrote a full model (float32) that no later stage reads."""
    out = tmp_path / "out"
    assert _run("warmup-dpo", bf16_tied_base, out, "--neuron_mask_ratio", "0.1") == 0
    files = {p.name for p in out.iterdir()}
    assert {"neuron_scores.safetensors", "neuron_scores.json", "neuron_mask", "training_args.json"} <= files
    assert not {"model.safetensors", "config.json", "training_args.bin"} & files
