"""Tiny GGUF files for tests, written here with the `gguf` package (no download): the testbed model as llama.cpp
lays it out (tensor names, q/k rows permuted for its rotary layout, a GPT-2-style BPE vocabulary), so transformers'
GGUF loader must give back the testbed's exact weights and tokens (checked in test_gguf_inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_LEVEL = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (what transformers' loader undoes)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_gguf(path: Path, folder: Path | None = None, quant: str | None = None, **metadata: str) -> Path:
    """``folder`` (default: the testbed model) as a llama GGUF file at ``path``; ``quant="Q8_0"`` stores the 2-D
    weights quantized; ``metadata``: extra ``general.*`` string fields (``repo_url="https://huggingface.co/o/n"``)."""
    import gguf

    from hf_align.testbed import MODEL_DIR

    folder = Path(folder or MODEL_DIR)
    config = json.loads((folder / "config.json").read_text())
    vocabulary = json.loads((folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_license("apache-2.0")
    for key, value in metadata.items():
        writer.add_string(f"general.{key}", value)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    qtype = None if quant is None else gguf.GGMLQuantizationType[quant]
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant is None else gguf.LlamaFileType[f"MOSTLY_{quant}"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = sorted(vocabulary["model"]["vocab"].items(), key=lambda item: item[1])
    special = {token["id"] for token in vocabulary["added_tokens"]}
    writer.add_token_list([token for token, _ in tokens])
    writer.add_token_types([3 if index in special else 1 for _, index in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocabulary["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    if (folder / "chat_template.jinja").is_file():
        writer.add_chat_template((folder / "chat_template.jinja").read_text())
    for name, weight in load_file(folder / "model.safetensors").items():
        weight = weight.astype(np.float32)
        if name in TOP_LEVEL:
            gguf_name = f"{TOP_LEVEL[name]}.weight"
        else:
            layer, module = name.split(".")[2], ".".join(name.split(".")[3:-1])
            if module == "self_attn.q_proj":
                weight = _permute(weight, config["num_attention_heads"])
            elif module == "self_attn.k_proj":
                weight = _permute(weight, config["num_key_value_heads"])
            gguf_name = f"blk.{layer}.{HF_TO_GGUF[module]}.weight"
        if qtype is not None and weight.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
