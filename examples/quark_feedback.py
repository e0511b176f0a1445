"""Quark on the real chat model: FeedbackConditionedTrainer with the task's programmatic reward.

Each round the model samples replies to training prompts of the instruction-following task
(examples/real_task.py: a word limit, "the number only"), the checker scores them, the pool sorts them into five
reward quantiles, and the model learns to reply conditioned on its quantile token (Quark's rule, a KL term to the
start model). At inference it is conditioned on the best quantile. On held-out prompts (unseen topics and
numbers) the measure is the checker's mean score of greedy replies:
- before training (no feedback token), and after: conditioned on the best bin, on the worst bin that holds
  samples, and without any feedback token.

    make real-model && python examples/quark_feedback.py              # target ≤ 10 min on 2 idle CPU cores (not yet measured)
    python examples/quark_feedback.py --smoke                          # a few prompts and steps (CI)
"""

from __future__ import annotations

import tempfile

import numpy as np
import real_task as task


def task_reward(prompts, completions, kind, limit, answer, **kwargs) -> list[float]:
    """The checker as a GRPO-style reward function (dataset columns arrive as keyword arguments)."""
    rows = [{"kind": k, "limit": n, "answer": a} for k, n, a in zip(kind, limit, answer)]
    return [task.reward(row, c[-1]["content"] if isinstance(c, list) else c) for row, c in zip(rows, completions)]


def main() -> None:
    p = task.parser(__doc__.splitlines()[0], lr=1e-5)
    p.add_argument("--rounds", type=int, default=3, help="sample-score-train rounds")
    p.add_argument("--steps_per_round", type=int, default=10, help="optimizer steps per round")
    args = p.parse_args()
    path = task.setup(args)
    from datasets import Dataset

    from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer

    if args.smoke:
        n_train, n_eval, rounds, steps, per_round, generations = 4, 2, 1, 1, 2, 2
    else:
        n_train, n_eval, rounds, steps, per_round, generations = 64, 32, args.rounds, args.steps_per_round, 32, 4
    train_rows, eval_rows = task.make_prompts(n_train, args.seed), task.make_prompts(n_eval, args.seed, held_out=True)
    model, tokenizer = task.load_model(path)
    metrics = {"held_out_reward_before": task.held_out_reward(model, tokenizer, eval_rows)}

    with tempfile.TemporaryDirectory() as tmp:
        config = FeedbackConditionedConfig(
            output_dir=tmp, feedback_type="quantile", num_quantiles=5, quantile_rule="quark", num_rounds=rounds,
            steps_per_round=steps, prompts_per_round=per_round, num_generations=generations,
            max_completion_length=task.GENERATION["max_new_tokens"], per_device_train_batch_size=4 if args.smoke else 8,
            learning_rate=args.lr, beta=0.05, lr_scheduler_type="constant", seed=args.seed, **task.QUIET,
        )  # fmt: skip
        trainer = FeedbackConditionedTrainer(
            model, config, Dataset.from_list(train_rows), processing_class=tokenizer, reward_funcs=task_reward
        )
        trainer.train()
    prompts = [r["prompt"] for r in eval_rows]
    worst = int(np.flatnonzero(trainer.pool.bin_counts())[-1])
    metrics["held_out_reward_best_bin"] = task.mean_reward(eval_rows, trainer.generate(prompts, do_sample=False))
    metrics["held_out_reward_worst_bin"] = task.mean_reward(
        eval_rows, trainer.generate(prompts, feedback=worst, do_sample=False)
    )
    metrics["held_out_reward_unconditioned"] = task.mean_reward(
        eval_rows, trainer.generate(prompts, unconditioned=True, do_sample=False)
    )
    config = {"train_prompts": n_train, "held_out_prompts": n_eval, "rounds": rounds, "steps_per_round": steps,
              "prompts_per_round": per_round, "num_generations": generations, "lr": args.lr, "worst_bin": worst,
              "pool_size": len(trainer.pool), "bin_counts": trainer.pool.bin_counts().tolist()}  # fmt: skip
    task.write_result(args, "quark_feedback", metrics, config)


if __name__ == "__main__":
    main()
