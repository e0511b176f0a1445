"""AMA on the real chat model: merge the base model with an aligned one, θ = α·θ_base + (1−α)·θ_aligned — linear
(α = 0.25 / 0.5 / 0.75), partwise (AMA's layer parts: α 0.4 | 0.3 | 0.2 for layers 0-9 | 10-19 | 20-29) and
adaptive (one α per block of 10 layers, learned by AdaptiveMergeTrainer on the chosen replies) — reward vs
retained knowledge.

The aligned model is a short full DPO on on-policy pairs of the instruction-following task
(examples/real_task.py), at a learning rate high enough to cost knowledge. For the base, the aligned model and
every merge (written by hf_align.merging in bf16), two measures on held-out prompts:
- reward: the task checker's mean score of greedy replies to unseen topics and numbers;
- knowledge: the share of the capital questions the base model answers right that the model still answers right.

    make real-model && python examples/ama_merge.py                   # target ≤ 10 min on 2 idle CPU cores (not yet measured)
    python examples/ama_merge.py --smoke                               # a few prompts and steps (CI)
"""

from __future__ import annotations

import shutil
import tempfile

import real_task as task


def main() -> None:
    p = task.parser(__doc__.splitlines()[0], steps=24, lr=3e-5)
    p.add_argument("--adaptive_steps", type=int, default=8, help="steps learning the adaptive α's")
    args = p.parse_args()
    path = task.setup(args)
    from datasets import Dataset

    from hf_align.merging import merge_models, partwise_plan
    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer

    n_train, n_eval, steps, ada_steps, asked = (4, 2, 1, 1, 6) if args.smoke else (48, 32, args.steps, args.adaptive_steps, None)  # fmt: skip
    alphas = [0.5] if args.smoke else [0.25, 0.5, 0.75]
    train_rows, eval_rows = task.make_prompts(n_train, args.seed), task.make_prompts(n_eval, args.seed, held_out=True)

    model, tokenizer = task.load_model(path)
    facts = task.known_facts(model, tokenizer, args.seed, asked)
    if not facts:
        raise SystemExit("the model answers none of the capital questions right: nothing to retain")

    def measure(name, candidate):
        metrics[f"reward_{name}"] = task.held_out_reward(candidate, tokenizer, eval_rows)
        metrics[f"knowledge_{name}"] = task.fact_accuracy(candidate, tokenizer, facts)

    metrics = {"reward_base": task.held_out_reward(model, tokenizer, eval_rows), "knowledge_base": 1.0}
    pairs = task.on_policy_pairs(model, tokenizer, train_rows, seed=args.seed)
    if len(pairs) == 0:
        raise SystemExit("every prompt's samples scored the same: no preference pair (try another --seed)")
    with tempfile.TemporaryDirectory() as tmp:
        aligned = task.train_dpo(model, tokenizer, pairs, args, f"{tmp}/dpo", steps, args.lr)
        aligned.save_pretrained(f"{tmp}/aligned")
        tokenizer.save_pretrained(f"{tmp}/aligned")
        measure("aligned", aligned)
        del aligned, model

        def measure_merge(name, **merge_kwargs):
            merge_models(path, f"{tmp}/aligned", f"{tmp}/{name}", dtype="bfloat16", progress=False, **merge_kwargs)
            measure(name, task.load_model(f"{tmp}/{name}")[0])
            shutil.rmtree(f"{tmp}/{name}")

        for alpha in alphas:
            measure_merge(f"linear_{alpha}", alpha=alpha)
        pivots, part_alphas = "10#20", "0.4|0.3|0.2"
        measure_merge("partwise", plan=lambda names, config: partwise_plan(names, pivots=pivots, alphas=part_alphas))

        sft = Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs["chosen"]})
        config = AdaptiveMergeConfig(
            output_dir=f"{tmp}/ama", max_steps=ada_steps, per_device_train_batch_size=4, learning_rate=2e-2,
            max_length=160, seed=args.seed, **task.QUIET,
        )  # fmt: skip
        trainer = AdaptiveMergeTrainer(f"{tmp}/aligned", base_model=path, args=config, train_dataset=sft)
        trainer.train()
        learned = trainer.learned_alphas()
        trainer.merge(f"{tmp}/adaptive", dtype="bfloat16", progress=False)  # streamed, with the learned α's
        del trainer
        measure("adaptive", task.load_model(f"{tmp}/adaptive")[0])
    config = {"pairs": len(pairs), "held_out_prompts": n_eval, "known_facts": len(facts), "dpo_steps": steps,
              "dpo_lr": args.lr, "linear_alphas": alphas, "partwise": {"pivots": pivots, "alphas": part_alphas},
              "adaptive_steps": ada_steps, "adaptive_block_alphas": [round(a, 4) for a in learned.block_alphas]}  # fmt: skip
    task.write_result(args, "ama_merge", metrics, config)


if __name__ == "__main__":
    main()
