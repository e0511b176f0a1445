"""GGUF input: bad files are one line naming the file (tiny files written here with the `gguf` package); the real
SmolLM2 GGUF loads dequantized, answers a chat question and converts to a plain safetensors folder.

The real-model tests need ``make real-model``; under CI (``CI=true``) a missing model is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_align.errors import UserError
from hf_align.gguf import gguf_file_of, read_gguf_info


gguf = pytest.importorskip("gguf") if not os.environ.get("CI") else __import__("gguf")


def _write_gguf(path: Path, architecture: str = "llama", raw_type=None) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_license("apache-2.0")
    if raw_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:
        block_bytes = gguf.GGML_QUANT_SIZES[raw_type][1]
        writer.add_tensor("token_embd.weight", np.zeros((1, block_bytes), dtype=np.uint8), raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_valid_header_is_read(tmp_path):
    info = read_gguf_info(_write_gguf(tmp_path / "m.gguf"))
    assert (info.architecture, info.name, info.license, info.tensor_types) == ("llama", "tiny", "apache-2.0", ("F32",))


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncated", "truncated or damaged"),
        ("not_gguf", "truncated or damaged"),
        ("empty", "truncated or damaged"),
        ("architecture", "architecture 'not-a-model' is not supported"),
        ("quant_type", "cannot be dequantized"),
    ],
)
def test_bad_gguf_is_one_line_naming_the_file(tmp_path, damage, expected):
    path = tmp_path / "bad.gguf"
    if damage == "truncated":
        whole = _write_gguf(tmp_path / "whole.gguf").read_bytes()
        path.write_bytes(whole[: len(whole) - 40])
    elif damage == "not_gguf":
        path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 4)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "architecture":
        _write_gguf(path, architecture="not-a-model")
    else:
        _write_gguf(path, raw_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UserError) as info:
        read_gguf_info(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf_info(tmp_path / "missing.gguf")


def test_which_arguments_name_a_gguf_file(tmp_path):
    assert gguf_file_of(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    assert gguf_file_of(tmp_path / "m.GGUF") == tmp_path / "m.GGUF"
    assert gguf_file_of(tmp_path, "m.gguf") == tmp_path / "m.gguf"
    assert gguf_file_of(tmp_path / "folder") is None
    assert gguf_file_of("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def _real_gguf() -> Path:
    from hf_align.testbed import real_model

    try:
        return real_model.gguf_path()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise  # CI runs `make real-model` first: a missing model there is a broken set-up, not a skip
        pytest.skip("the real model is not installed (make real-model)")


@pytest.mark.slow
def test_the_real_gguf_loads_dequantized_answers_and_converts(tmp_path):
    """SmolLM2-135M-Instruct: 30 layers, tied embeddings, bf16 dense weights; a greedy chat answer; the converted
    folder is a plain safetensors model with the same weights and a card naming the GGUF source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_align.gguf import gguf_load_kwargs
    from hf_align.loading import convert_gguf

    path = _real_gguf()
    folder, kwargs = gguf_load_kwargs(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=kwargs["gguf_file"])
    assert (model.config.num_hidden_layers, model.config.tie_word_embeddings) == (30, True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(answer)

    out = convert_gguf(path, tmp_path / "smollm2")
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".gguf")) for name in names)
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.dtype == torch.bfloat16
    assert not hasattr(saved.config, "quantization_config")
    for (name, ours), theirs in zip(saved.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    card = (out / "README.md").read_text()
    assert path.name in card and "license: apache-2.0" in card
    assert str(path.parent) not in (out / "config.json").read_text()  # no local path of the writer


@pytest.mark.slow
def test_the_loaders_and_a_trainer_take_a_gguf_path(tmp_path):
    """hf_align.loading (every command's loader) and a trainer's string model take the .gguf path itself: dequantized
    to the asked dtype, the tokenizer from the same file; a quantization_config on top is refused by name."""
    from hf_align.loading import load_model, load_tokenizer
    from hf_align.trainers._base import load_model as trainer_load_model

    path = _real_gguf()
    model = load_model(path, dtype="float32")
    tokenizer = load_tokenizer(path)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    class Args:
        model_init_kwargs = {"dtype": "bfloat16"}
        trust_remote_code = False

        class distributed_state:  # noqa: N801 (what TRL's args hold)
            distributed_type = "NO"

    policy = trainer_load_model(str(path), Args)
    assert policy.dtype == torch.bfloat16
    ours, theirs = policy.model.layers[5].mlp.up_proj.weight.float(), model.model.layers[5].mlp.up_proj.weight
    torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=1e-6)  # the same weights, in bf16
    from transformers import BitsAndBytesConfig

    with pytest.raises(UserError, match="loaded dequantized; quantization_config"):
        load_model(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
