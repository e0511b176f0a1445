"""What a training command saves keeps the base model's dtype and config (issue #29.3), written all or nothing
(issue #28.10): a tiny bf16 Llama with tied embeddings, through the CLI as a user runs it."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_align import testbed


TINY = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--max_steps", "1", "--save_strategy", "no"]
TINY += ["--per_device_train_batch_size", "2", "--max_length", "64", "--plots", "false"]


def _dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            dtypes |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    return dtypes


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


DATA = {"masked-dpo": "testbed:preference", "npo": "testbed:forget", "masked-kto": "testbed:preference"}


def _train(command: str, base: Path, output: Path, *extra: str) -> None:
    from hf_align.cli.training import run_command

    argv = ["--model_name_or_path", str(base), "--dataset_name", DATA[command], "--output_dir", str(output)]
    assert run_command(command, [*argv, *TINY, *extra], launch=False) == 0


@pytest.mark.parametrize("command", ["masked-dpo", "npo"])
def test_final_save_keeps_the_base_dtype_and_config(bf16_tied_base, tmp_path, command):
    """Fails on main: TRL loads a name in float32 and the saved model was float32 (twice the size) with
    ``use_cache: false``."""
    _train(command, bf16_tied_base, tmp_path / "out")
    out = tmp_path / "out"
    assert _dtypes(out) == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True and config["tie_word_embeddings"] is True
    assert _weights_bytes(out) <= _weights_bytes(bf16_tied_base) * 1.01  # tied: the embedding is stored once
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    loaded = __import__("transformers").AutoModelForCausalLM.from_pretrained(out)
    assert (
        loaded.dtype == torch.bfloat16
        and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    )


def test_an_explicit_dtype_is_what_is_saved(bf16_tied_base, tmp_path):
    _train("masked-dpo", bf16_tied_base, tmp_path / "out", "--dtype", "float32")
    assert _dtypes(tmp_path / "out") == {"F32"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def _full_disk(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"partial")  # mid-save: half a file on disk, then the error
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))


def test_python_api_model_object_keeps_its_dtype(bf16_tied_base, tmp_path, monkeypatch):
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from hf_align.errors import UserError
    from hf_align.trainers import MaskedDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(bf16_tied_base)  # transformers 5: the checkpoint's dtype
    assert model.dtype == torch.bfloat16
    args = DPOConfig(str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                     per_device_train_batch_size=2, max_length=64)  # fmt: skip
    trainer = MaskedDPOTrainer(
        model, args=args, train_dataset=_preference(), processing_class=testbed.load_tokenizer()
    )
    trainer.train()
    trainer.save_model()
    assert _dtypes(tmp_path / "o") == {"BF16"}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["use_cache"] is True
    before = _snapshot(tmp_path / "o")  # the Python API's save_model is all or nothing too
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        trainer.save_model()
    assert _snapshot(tmp_path / "o") == before


def _preference():
    return testbed.preference_dataset(4, seed=0).remove_columns("rejected_wrong_positions")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_final_save_leaves_the_previous_output_as_it_was(bf16_tied_base, tmp_path, monkeypatch, capsys, code):
    """Fails on main: the writer's error came as a traceback after training and left ``config.json`` (written
    first) beside the previous weights, or without any."""
    import transformers.modeling_utils

    from hf_align.cli.errors import run_guarded
    from hf_align.cli.training import run_command

    out = tmp_path / "out"
    _train("masked-dpo", bf16_tied_base, out)
    before = _snapshot(out)
    real = transformers.modeling_utils.safe_save_file

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # mid-save: half a file on disk, then the error
        raise OSError(code, os.strerror(code), str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    argv = [
        "--model_name_or_path",
        str(bf16_tied_base),
        "--dataset_name",
        "testbed:preference",
        "--output_dir",
        str(out),
    ]
    capsys.readouterr()
    assert run_guarded("masked-dpo", lambda: run_command("masked-dpo", [*argv, *TINY], launch=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-align masked-dpo: saving the model to {str(out)!r} failed: ")
    assert errno.errorcode[code] in err[0] and "the save needs about " in err[0] and " are free there" in err[0]
    assert _snapshot(out) == before  # every file as it was, nothing added (no temporary folder left)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)


def test_saving_into_an_empty_folder_on_failure_leaves_no_config_without_weights(tmp_path, monkeypatch):
    from hf_align.errors import UserError
    from hf_align.saving import all_or_nothing

    with pytest.raises(UserError, match=r"No space left on device \(ENOSPC\); the save needs about 2\.00 GB"):
        with all_or_nothing(tmp_path, needed_bytes=2 * 10**9) as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_a_new_save_replaces_the_weights_of_an_earlier_one(tmp_path):
    """Shards of an earlier, sharded save are removed once the new weights are in; other files stay."""
    from hf_align.saving import all_or_nothing

    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                 "config.json", "trainer_state.json"):  # fmt: skip
        (tmp_path / name).write_text("old")
    with all_or_nothing(tmp_path) as tmp:
        (tmp / "model.safetensors").write_text("new")
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json"]
    assert (tmp_path / "config.json").read_text() == "new"


def test_a_masked_run_saves_merged_weights_in_the_base_dtype_and_keeps_exact_deltas(bf16_tied_base, tmp_path):
    """The merged final save and a checkpoint's merged weights are bf16 (fails on main: float32); the checkpoint's
    deltas, which a resume reads back, keep the training dtype."""
    from transformers import AutoModelForCausalLM

    from hf_align.masks import NeuronMask

    mask = NeuronMask.random(AutoModelForCausalLM.from_pretrained(bf16_tied_base), 0.1, granularity="row")
    mask.save(tmp_path / "mask")
    out = tmp_path / "out"
    _train("masked-dpo", bf16_tied_base, out, "--neuron_mask_path", str(tmp_path / "mask"), "--save_strategy", "steps",
           "--save_steps", "1")  # fmt: skip
    assert _dtypes(out) == {"BF16"} and _dtypes(out / "checkpoint-1") == {"BF16"}
    assert json.loads((out / "checkpoint-1" / "config.json").read_text())["use_cache"] is True
    assert _dtypes(out / "checkpoint-1" / "neuron_deltas") == {"F32", "U8"}  # the deltas (and the mask's bits)
