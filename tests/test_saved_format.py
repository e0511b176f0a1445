"""What a training command saves keeps the base model's dtype and config (issue #29.3), written all or nothing
(issue #28.10): a tiny bf16 Llama with tied embeddings, through the CLI as a user runs it."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_align import testbed


TINY = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--max_steps", "1", "--save_strategy", "no"]
TINY += ["--per_device_train_batch_size", "2", "--max_length", "64", "--plots", "false"]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    """A bf16 Llama checkpoint with tied embeddings (as SmolLM2), its tokenizer beside it."""
    folder = tmp_path_factory.mktemp("bf16_base")
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64, tie_word_embeddings=True)
    model.to(torch.bfloat16).save_pretrained(folder)
    testbed.load_tokenizer().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def _dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            dtypes |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    return dtypes


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _train(command: str, base: Path, output: Path, *extra: str) -> None:
    from hf_align.cli.training import run_command

    argv = ["--model_name_or_path", str(base), "--dataset_name", "testbed:preference", "--output_dir", str(output)]
    assert run_command(command, [*argv, *TINY, *extra], launch=False) == 0


def test_final_save_keeps_the_base_dtype_and_config(bf16_base, tmp_path):
    """Fails on main: TRL loads a name in float32 and the saved model was float32 (twice the size) with
    ``use_cache: false``."""
    _train("masked-dpo", bf16_base, tmp_path / "out")
    out = tmp_path / "out"
    assert _dtypes(out) == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True and config["tie_word_embeddings"] is True
    assert _weights_bytes(out) <= _weights_bytes(bf16_base) * 1.01  # tied: the embedding is stored once
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    loaded = __import__("transformers").AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_an_explicit_dtype_is_what_is_saved(bf16_base, tmp_path):
    _train("masked-dpo", bf16_base, tmp_path / "out", "--dtype", "float32")
    assert _dtypes(tmp_path / "out") == {"F32"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_python_api_model_object_keeps_its_dtype(bf16_base, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from hf_align.trainers import MaskedDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(bf16_base)  # transformers 5: the checkpoint's dtype
    assert model.dtype == torch.bfloat16
    args = DPOConfig(str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                     per_device_train_batch_size=2, max_length=64)  # fmt: skip
    trainer = MaskedDPOTrainer(model, args=args, train_dataset=_preference(), processing_class=testbed.load_tokenizer())
    trainer.train()
    trainer.save_model()
    assert _dtypes(tmp_path / "o") == {"BF16"}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["use_cache"] is True


def _preference():
    return testbed.preference_dataset(4, seed=0).remove_columns("rejected_wrong_positions")
