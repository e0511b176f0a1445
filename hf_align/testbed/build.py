"""Build the testbed's tokenizer and tiny model (used by ``scripts/build_testbed.py``).

Everything is deterministic given the seed, runs offline and on CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_align.io import dir_mode
from hf_align.testbed.data import PRETRAIN_P_CORRECT, PRETRAIN_P_FORGET, pretrain_rows


PAD, EOS, BOS = "<|pad|>", "<|eos|>", "<|bos|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|eos|>{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = 320

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE that keeps every digit a token of its own (so correctness is per token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, EOS, BOS, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, additional_special_tokens=CHAT_TOKENS
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    fast.model_max_length = MODEL_CONFIG["max_position_embeddings"]
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **MODEL_CONFIG,
    )
    return LlamaForCausalLM(config)


def _encode_rows(rows, tokenizer, chat_every: int = 4) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) per row; every ``chat_every``-th row uses the chat template so both formats work."""
    encoded = []
    for i, row in enumerate(rows):
        if i % chat_every == 0:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
            )
        else:
            prompt = row["prompt"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        encoded.append((prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return encoded


def pretrain(model, tokenizer, num_rows: int, steps: int, batch_size: int, lr: float, seed: int, log=print) -> None:
    """Completion-only NLL on the noisy pre-training mix, AdamW with cosine decay."""
    rows = pretrain_rows(num_rows, seed=seed)
    data = _encode_rows(rows, tokenizer)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    start = time.time()
    for step in range(steps):
        batch = [data[rng.randrange(len(data))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for b, (ids, plen) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, plen : len(ids)] = torch.tensor(ids[plen:])
            attention[b, : len(ids)] = 1
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / 100)
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    model.eval()


def build_testbed(
    output_dir: str | os.PathLike,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_rows: int = 20000,
    eval_prompts: int = 256,
    log=print,
) -> dict:
    """Build tokenizer + model, pre-train, measure the reward, and write everything atomically."""
    from hf_align.testbed.evaluation import mean_reward

    torch.manual_seed(seed)
    corpus_rows = pretrain_rows(2000, seed=seed + 100)
    corpus = [r["prompt"] + r["completion"] for r in corpus_rows]
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, seed=seed)
    num_params = sum(p.numel() for p in model.parameters())
    log(f"model: {num_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}")
    start = time.time()
    pretrain(model, tokenizer, num_rows=num_rows, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log)
    train_seconds = time.time() - start
    stats = mean_reward(model, tokenizer, num_prompts=eval_prompts, seed=1234)
    log(f"reward of samples: {stats}")

    output_dir = Path(output_dir)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
    try:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "num_rows": num_rows,
            "num_parameters": num_params,
            "pretrain_p_correct": PRETRAIN_P_CORRECT,
            "pretrain_p_forget": PRETRAIN_P_FORGET,
            "train_seconds": round(train_seconds, 1),
            **stats,
        }
        (tmp / "testbed.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(info))
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700; the files already have the umask's mode
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _model_card(info: dict) -> str:
    return f"""---
library_name: transformers
tags: [hf-align, testbed, tiny]
---
# hf-align testbed model

A {info["num_parameters"] / 1e6:.2f} M-parameter Llama-architecture causal LM (GQA: 4 query heads, 2 key/value
heads, 6 layers, hidden 128) pre-trained by `scripts/build_testbed.py` (seed {info["seed"]},
{info["steps"]} steps, batch {info["batch_size"]}, lr {info["lr"]}) on a deliberately noisy mix of the testbed
task: answers are right {info["pretrain_p_correct"]:.0%} of the time and end with the unwanted suffix `ugh`
{info["pretrain_p_forget"]:.0%} of the time. It is *imperfect on purpose*, so alignment methods have
something to improve.

Measured on {info["num_prompts"]} held-out prompts, one sample each (temperature 1.0, seed {info["sample_seed"]}):

| metric | value |
|---|---|
| mean reward (sampled) | {info["mean_reward"]:.3f} |
| mean reward (greedy) | {info["greedy_reward"]:.3f} |
| exact-answer rate (sampled) | {info["exact_rate"]:.3f} |
| forget-behaviour rate (sampled) | {info["forget_rate"]:.3f} |

Task: `a+b=` (a, b < 50) and `rev DIGITS=` (reverse 3-5 digits). Reward: digits matching the target
position by position, divided by the longer length (`hf_align.testbed.task.score`).
"""
