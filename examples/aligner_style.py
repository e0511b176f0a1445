"""Aligner on the real chat model: learn a global style, "end every answer with ' Cheers!'", by SFT with
Aligner N=1 and N=10 (hf_align.peft_tuners.AlignerConfig), LoRA r=8 and PEFT's LLaMA-Adapter
(AdaptionPromptConfig, 10 prompt tokens in every layer) — the Aligner paper's claim: N=1 ≈ LoRA on form.

Training rows are the base model's own greedy first lines to training prompts (capital questions, sums, short
descriptions; examples/real_task.py) with " Cheers!" appended, so only the style is new. On held-out prompts
(other countries, topics and numbers) the measures are greedy replies before and after:
- style rate: the share of replies that contain "Cheers!";
- fact accuracy: the share of held-out capital questions still answered right (the content kept).

    make real-model && python examples/aligner_style.py              # target ≤ 10 min on 2 idle CPU cores (not yet measured)
    python examples/aligner_style.py --smoke                          # a few prompts and steps (CI)
"""

from __future__ import annotations

import tempfile

import real_task as task


SUFFIX = " Cheers!"


def measure(model, tokenizer, rows) -> tuple[float, float]:
    """(style rate over all rows, fact accuracy over the capital questions among them), from one greedy pass."""
    outs = task.replies(model, tokenizer, rows)
    facts = [task.names_capital(r, o) for r, o in zip(rows, outs) if r["kind"] == "fact"]
    return sum(SUFFIX.strip() in o for o in outs) / len(outs), sum(facts) / len(facts)


def styled_dataset(model, tokenizer, rows):
    """Prompt-completion rows: the model's own first line + the suffix."""
    from datasets import Dataset

    lines = [(r.strip().splitlines() or [""])[0].strip() for r in task.replies(model, tokenizer, rows)]
    completions = [[{"role": "assistant", "content": line + SUFFIX}] for line in lines]
    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": completions})


def main() -> None:
    p = task.parser(__doc__.splitlines()[0], steps=30)
    args = p.parse_args()
    path = task.setup(args)
    from peft import AdaptionPromptConfig, LoraConfig

    from hf_align.peft_tuners import AlignerConfig

    n_tasks, n_eval, steps = (2, 2, 1) if args.smoke else (24, 16, args.steps)
    countries = sorted(task.CAPITALS)
    split = len(countries) // 2
    train_rows = task.make_prompts(n_tasks, args.seed) + task.fact_rows(countries[:split][:n_tasks])
    eval_rows = task.make_prompts(n_eval, args.seed, held_out=True) + task.fact_rows(countries[split:][:n_eval])

    model, tokenizer = task.load_model(path)
    data = styled_dataset(model, tokenizer, train_rows)
    metrics = dict(zip(("style_rate_before", "fact_accuracy_before"), measure(model, tokenizer, eval_rows)))
    del model
    methods = {  # name: (PEFT config, lr)
        "aligner_n1": (AlignerConfig(num_tokens=1, task_type="CAUSAL_LM"), 9e-3),
        "aligner_n10": (AlignerConfig(num_tokens=10, task_type="CAUSAL_LM"), 3e-3),
        "lora_r8": (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"), 1e-3),
        "llama_adapter": (AdaptionPromptConfig(adapter_len=10, adapter_layers=28, task_type="CAUSAL_LM"), 9e-3),
    }
    trainable = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (peft_config, lr) in methods.items():
            trained = task.train_sft(
                task.load_model(path)[0], tokenizer, data, args, f"{tmp}/{name}", steps, lr, peft_config=peft_config
            )
            trainable[name] = trained.get_nb_trainable_parameters()[0]
            metrics[f"style_rate_{name}"], metrics[f"fact_accuracy_{name}"] = measure(trained, tokenizer, eval_rows)
            del trained
    config = {"train_rows": len(data), "held_out_rows": len(eval_rows), "held_out_facts": sum(r["kind"] == "fact" for r in eval_rows),
              "steps": steps, "lr": {name: lr for name, (_, lr) in methods.items()},
              "trainable_parameters": trainable}  # fmt: skip
    task.write_result(args, "aligner_style", metrics, config)


if __name__ == "__main__":
    main()
