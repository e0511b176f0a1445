"""The bad-input catalogue: each case gets a specific message and leaves nothing half-written.

Cases are grouped by where the input enters: files and outputs (hf_align.io), the CLI and recipes,
the testbed, and each method's public API.
"""

import errno
import os
from pathlib import Path

import pytest
import torch

from hf_align import io


# --- files and outputs ---------------------------------------------------------------------------


def test_output_dir_that_exists_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with io.atomic_dir(out):
            pass
    assert (out / "keep.txt").read_text() == "previous run"


def test_failure_inside_atomic_dir_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_overwrite_failure_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "model.txt").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (out / "model.txt").read_text() == "v1"


def test_disk_full_on_save_leaves_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "scores.safetensors"
    io.save_tensors(target, {"a": torch.ones(3)})

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_tensors(target, {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(io.load_tensors(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["scores.safetensors"]  # no temp file left behind


def test_read_only_output_dir_leaves_nothing(tmp_path, monkeypatch):
    """Root ignores chmod, so the refusal the OS would give is simulated at the rename."""
    target = tmp_path / "plan.json"

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        io.write_json(target, {"alpha": 0.2})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    io.save_tensors(path, {"w": torch.randn(16, 16)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*not a valid safetensors file"):
        io.load_tensors(path)


def test_garbage_safetensors_names_the_file(tmp_path):
    path = tmp_path / "mask.safetensors"
    path.write_bytes(b"this is not safetensors")
    with pytest.raises(ValueError, match=r"mask\.safetensors.*not a valid safetensors file"):
        io.load_tensors(path)


def test_missing_safetensors_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        io.load_tensors(tmp_path / "nothing.safetensors")


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "neuron_mask.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"neuron_mask\.json.*not valid JSON"):
        io.read_json(path)


# --- CLI and recipes ---------------------------------------------------------------------------


TINY = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--max_steps", "1"]


def test_recipe_typo_names_the_field(tmp_path):
    from hf_align.cli.training import run_command

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: testbed\ndataset_name: testbed:preference\nbetta: 0.1\n")
    with pytest.raises(SystemExit, match="unknown field.*betta"):
        run_command("aligner-dpo", ["--config", str(recipe), *TINY, "--output_dir", str(tmp_path / "o")], launch=False)
    assert not (tmp_path / "o").exists()


def test_unknown_testbed_dataset(tmp_path):
    from hf_align.cli.common import load_dataset_any

    with pytest.raises(ValueError, match="'testbed:preferences': unknown testbed dataset"):
        load_dataset_any("testbed:preferences")


def test_unsupported_data_file_type(tmp_path):
    from hf_align.cli.common import load_dataset_any

    path = tmp_path / "pairs.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        load_dataset_any(str(path))


def test_missing_split_is_named():
    from hf_align.cli.common import load_dataset_any, split

    with pytest.raises(ValueError, match="split 'validation' not found; available splits: \\['train'\\]"):
        split(load_dataset_any("testbed:sft"), "validation", "dataset_name 'testbed:sft'")


def test_missing_column_is_named(tmp_path):
    from hf_align.cli.training import run_command

    argv = [
        "--model_name_or_path",
        "testbed",
        "--dataset_name",
        "testbed:prompts",
        *TINY,
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen', 'rejected'\]; found \['prompt'\]"):
        run_command("aligner-dpo", argv, launch=False)


# --- testbed -------------------------------------------------------------------------------------


def test_unknown_architecture_for_tiny_model():
    from hf_align.testbed import load_random_tiny

    with pytest.raises(ValueError, match="Unknown architecture 'gpt2'.*llama"):
        load_random_tiny("gpt2")


def test_reward_of_non_testbed_prompt():
    from hf_align.testbed import reward

    with pytest.raises(ValueError, match="Not a testbed prompt"):
        reward(["hello"], ["5"])
