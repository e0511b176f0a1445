"""Aligner vs LoRA r=8 (q, v) vs the base model: trainable parameters, training step time, forward and greedy throughput.

Same random-init Llama, same batch, one process; each timing is the median of several repeats after a warm-up.
Goals (issue "Aligner PEFT tuner"): trainable params ≤ 1/50 of LoRA r=8; forward and greedy-generation throughput
≥ 0.95× the base model's. Prints a table and writes ``benchmarks/results/aligner[_quick].json``.

    python -m benchmarks.aligner --quick      # tiny model, seconds
    python -m benchmarks.aligner              # ~30M-param Llama, batch 4 × 128 tokens
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from benchmarks import RESULTS_DIR


os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = RESULTS_DIR
SIZES = {
    "quick": dict(hidden_size=64, num_layers=4, intermediate_size=128, num_heads=4, num_kv_heads=2, seq=32, gen=16),
    "full": dict(hidden_size=512, num_layers=8, intermediate_size=1408, num_heads=8, num_kv_heads=4, seq=128, gen=32),
}


def _model(size: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=size["hidden_size"],
        num_hidden_layers=size["num_layers"],
        intermediate_size=size["intermediate_size"],
        num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_kv_heads"],
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model, batch, optimizer):
    def step():
        model.train()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(name: str, model, batch, gen_prompt, gen_tokens: int, repeats: int) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    row = {"config": name, "trainable_params": sum(p.numel() for p in trainable)}

    def forward():
        with torch.no_grad():
            model(**batch)

    def generate():
        with torch.no_grad():
            model.generate(gen_prompt, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)

    model.eval()
    row["forward_s"] = _median_seconds(forward, repeats)
    row["generate_s"] = _median_seconds(generate, max(1, repeats // 2))
    if trainable:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        row["train_step_s"] = _median_seconds(_train_step(model, batch, optimizer), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    import hf_align  # noqa: F401  (registers Aligner with PEFT)
    from hf_align.io import write_json
    from hf_align.peft_tuners import AlignerConfig

    size = SIZES["quick" if args.quick else "full"]
    torch.manual_seed(0)
    base = _model(size)
    batch = {"input_ids": torch.randint(3, 8192, (4, size["seq"]))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    gen_prompt = batch["input_ids"][:1, :16]
    rows = [measure("base", base.requires_grad_(False), batch, gen_prompt, size["gen"], args.repeats)]
    for name, config in [
        ("aligner_n1", AlignerConfig(num_tokens=1, task_type="CAUSAL_LM")),
        ("aligner_n10", AlignerConfig(num_tokens=10, task_type="CAUSAL_LM")),
        ("lora_r8_qv", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ]:
        model = get_peft_model(copy.deepcopy(base), config)
        rows.append(measure(name, model, batch, gen_prompt, size["gen"], args.repeats))
    by_name = {row["config"]: row for row in rows}
    lora, plain = by_name["lora_r8_qv"], by_name["base"]
    for row in rows:
        row["forward_throughput_vs_base"] = plain["forward_s"] / row["forward_s"]
        row["generate_throughput_vs_base"] = plain["generate_s"] / row["generate_s"]
        if "train_step_s" in row:
            row["train_step_vs_lora"] = row["train_step_s"] / lora["train_step_s"]
            row["params_vs_lora"] = row["trainable_params"] / lora["trainable_params"]
    result = {
        "benchmark": "aligner",
        "quick": args.quick,
        "model_params": sum(p.numel() for p in base.parameters()),
        "size": size,
        "torch_threads": torch.get_num_threads(),
        "goals": {"params_vs_lora": "<= 0.02", "forward/generate throughput vs base": ">= 0.95"},
        "results": rows,
    }
    header = (
        f"{'config':<12} {'params':>9} {'vs LoRA':>8} {'step s':>8} {'vs LoRA':>8} {'fwd×base':>9} {'gen×base':>9}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['config']:<12} {row['trainable_params']:>9} {row.get('params_vs_lora', float('nan')):>8.4f} "
            f"{row.get('train_step_s', float('nan')):>8.4f} {row.get('train_step_vs_lora', float('nan')):>8.3f} "
            f"{row['forward_throughput_vs_base']:>9.3f} {row['generate_throughput_vs_base']:>9.3f}"
        )
    path = RESULTS / f"aligner{'_quick' if args.quick else ''}.json"
    write_json(path, result)
    print(f"wrote {path}")
    print(json.dumps({"model_params": result["model_params"]}))


if __name__ == "__main__":
    main()
