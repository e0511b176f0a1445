"""ALLO on the real chat model: masked DPO on 10 % of the neurons vs full DPO and LoRA r=8, on on-policy pairs.

The model samples four replies per training prompt, the task's checker ranks them (examples/real_task.py), and the
best and worst become a preference pair. Three runs start from the same model with the same pairs and steps:
- full DPO (trl.DPOTrainer), LoRA r=8 DPO (PEFT, 20× the lr), and
- ALLO: a short warm-up DPO scores every row by its accumulated gradient (MaskAccumulationCallback), the top 10 %
  of rows become a NeuronMask, and MaskedDPOTrainer trains only those rows from the original model (10× the lr).
The measure is the mean checker score of greedy replies to held-out prompts (unseen topics and numbers), before
and after.

    make real-model && python examples/allo_masked_dpo.py            # target ≤ 10 min on 2 idle CPU cores (not yet measured)
    python examples/allo_masked_dpo.py --smoke                        # a few prompts and steps (CI)
"""

from __future__ import annotations

import tempfile

import real_task as task


def main() -> None:
    p = task.parser(__doc__.splitlines()[0], steps=24, lr=5e-6)
    p.add_argument("--mask_ratio", type=float, default=0.1, help="share of rows ALLO trains")
    args = p.parse_args()
    path = task.setup(args)
    from peft import LoraConfig

    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.masks import NeuronMask
    from hf_align.scores import load_scores

    n_train, n_eval, steps, warmup = (4, 2, 1, 1) if args.smoke else (48, 32, args.steps, max(args.steps // 3, 2))
    train_rows, eval_rows = task.make_prompts(n_train, args.seed), task.make_prompts(n_eval, args.seed, held_out=True)

    model, tokenizer = task.load_model(path)
    metrics = {"held_out_reward_before": task.held_out_reward(model, tokenizer, eval_rows)}
    pairs = task.on_policy_pairs(model, tokenizer, train_rows, seed=args.seed)
    if len(pairs) == 0:
        raise SystemExit("every prompt's samples scored the same: no preference pair (try another --seed)")
    with tempfile.TemporaryDirectory() as tmp:
        full = task.train_dpo(task.load_model(path)[0], tokenizer, pairs, args, f"{tmp}/full", steps, args.lr)
        metrics["full_dpo"] = task.held_out_reward(full, tokenizer, eval_rows)
        del full
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        lora_model = task.train_dpo(
            task.load_model(path)[0], tokenizer, pairs, args, f"{tmp}/lora", steps, args.lr * 20, peft_config=lora
        )
        metrics["lora_r8_dpo"] = task.held_out_reward(lora_model, tokenizer, eval_rows)
        del lora_model

        callback = MaskAccumulationCallback(method="gradient", granularity="row")
        task.train_dpo(
            task.load_model(path)[0], tokenizer, pairs, args, f"{tmp}/warmup", warmup, args.lr, callbacks=[callback]
        )
        scores, _ = load_scores(f"{tmp}/warmup")
        mask = NeuronMask.from_scores(scores, args.mask_ratio)
        allo = task.train_dpo(model, tokenizer, pairs, args, f"{tmp}/allo", steps, args.lr * 10, neuron_mask=mask)
        metrics["allo_masked_dpo"] = task.held_out_reward(allo, tokenizer, eval_rows)
    config = {"pairs": len(pairs), "train_prompts": n_train, "held_out_prompts": n_eval, "steps": steps,
              "warmup_steps": warmup, "lr": args.lr, "lora_lr": args.lr * 20, "allo_lr": args.lr * 10,
              "mask": repr(mask)}  # fmt: skip
    task.write_result(args, "allo_masked_dpo", metrics, config)


if __name__ == "__main__":
    main()
