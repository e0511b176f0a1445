"""NPO on the real chat model: unlearn chosen facts the model knows, keep the others.

The facts are capital cities the base model answers right (examples/real_task.py). A few become the forget set
("The capital of France is Paris.", token weights 1 on "Paris" and 0 elsewhere: ALLO's token-level forgetting),
as many others the retain set (an NLL retain term on the whole statement), and the rest are held out. NPOTrainer
(token-level NPO against the frozen start model) runs on the forget set with the retain term; the measures are
greedy answers before and after:
- forget rate: the share of forget questions no longer answered right;
- retained accuracy: the share of retain-set questions still right, and of held-out questions (never trained on).

    make real-model && python examples/npo_unlearning.py             # target ≤ 10 min on 2 idle CPU cores (not yet measured)
    python examples/npo_unlearning.py --smoke                         # a few facts and steps (CI)
"""

from __future__ import annotations

import tempfile

import real_task as task


def statements(rows, tokenizer=None):
    """Prompt-completion rows stating each fact (the NPO forget / retain format). With ``tokenizer``, a
    ``completion_weights`` column puts weight 1 on the capital's tokens only, 0 on the shared template ("The capital
    of ... is"), so the forget term pushes down the fact, not the way every answer is phrased."""
    from datasets import Dataset

    from hf_align.token_weights import weights_from_char_spans

    data = {
        "prompt": [r["prompt"] for r in rows],
        "completion": [[{"role": "assistant", "content": task.fact_statement(r)}] for r in rows],
    }
    if tokenizer is not None:
        data["completion_weights"] = [
            weights_from_char_spans(tokenizer, prompt, completion, [_span(completion[0]["content"], row["answer"])],
                                    special=0.0)
            for prompt, completion, row in zip(data["prompt"], data["completion"], rows)
        ]  # fmt: skip
    return Dataset.from_dict(data)


def _span(text: str, answer: str) -> tuple[int, int]:
    start = text.rindex(answer)
    return start, start + len(answer)


def main() -> None:
    p = task.parser(__doc__.splitlines()[0], steps=30, lr=5e-6)
    p.add_argument("--forget", type=int, default=6, help="how many known facts to forget")
    args = p.parse_args()
    path = task.setup(args)
    from hf_align.trainers import NPOConfig, NPOTrainer

    model, tokenizer = task.load_model(path)
    n_forget, steps, asked = (2, 1, 8) if args.smoke else (args.forget, args.steps, None)
    known = task.known_facts(model, tokenizer, args.seed, asked)
    if len(known) < 3 * n_forget:
        raise SystemExit(f"the model knows {len(known)} capitals, fewer than 3 × --forget ({n_forget})")
    forget, retain, held_out = known[:n_forget], known[n_forget : 2 * n_forget], known[2 * n_forget :]

    with tempfile.TemporaryDirectory() as tmp:
        config = NPOConfig(
            output_dir=tmp, max_steps=steps, learning_rate=args.lr, per_device_train_batch_size=2, beta=0.1,
            npo_level="token", retain_loss_type="nll", retain_weight=1.0, lr_scheduler_type="constant",
            max_length=96, seed=args.seed, **task.QUIET,
        )  # fmt: skip
        trainer = NPOTrainer(
            model, ref_model=task.load_model(path)[0], args=config, train_dataset=statements(forget, tokenizer),
            retain_dataset=statements(retain), processing_class=tokenizer,
        )  # fmt: skip
        trainer.train()
    model = trainer.model
    metrics = {
        "forget_rate": 1.0 - task.fact_accuracy(model, tokenizer, forget),  # all were right before
        "retain_set_accuracy": task.fact_accuracy(model, tokenizer, retain),
        "held_out_fact_accuracy": task.fact_accuracy(model, tokenizer, held_out),
    }
    config = {"known_facts": len(known), "forget": [r["country"] for r in forget], "retain": len(retain),
              "held_out": len(held_out), "steps": steps, "lr": args.lr, "beta": 0.1,
              "before": "every forget, retain and held-out fact answered right (known facts only)"}  # fmt: skip
    task.write_result(args, "npo_unlearning", metrics, config)


if __name__ == "__main__":
    main()
