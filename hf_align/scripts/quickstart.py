"""What ``hf-align quickstart`` runs (:mod:`hf_align.cli.quickstart` parses): the testbed's reward before, a
warm-up mask and a masked DPO run (or plain DPO), the reward after.
"""

from __future__ import annotations

import copy
import tempfile
import time


def _warmup_mask(tb, dataset, common: dict, args, output_dir: str):
    """ALLO's first stage in miniature: a DPO warm-up whose accumulated row gradients pick the mask."""
    from trl import DPOConfig, DPOTrainer

    from hf_align.callbacks import MaskAccumulationCallback

    callback = MaskAccumulationCallback(method="gradient", granularity="row", select_ratio=args.neuron_mask_ratio)
    warm = copy.deepcopy(tb.model)
    config = DPOConfig(**{**common, "output_dir": f"{output_dir}/warmup", "max_steps": args.warmup_steps})
    config.learning_rate = 5e-4
    DPOTrainer(
        model=warm,
        ref_model=copy.deepcopy(tb.model),
        args=config,
        train_dataset=dataset,
        processing_class=tb.tokenizer,
        callbacks=[callback],
    ).train()
    from hf_align.masks import NeuronMask

    return NeuronMask.load(f"{output_dir}/warmup/neuron_mask")


def run(args) -> dict:
    """The quickstart as ``args`` (:class:`hf_align.cli.quickstart.QuickstartArguments`) asks: rewards before/after."""
    from trl import DPOConfig, DPOTrainer

    from hf_align import testbed
    from hf_align.scripts.utils import refuse_existing_output

    if args.output_dir:
        refuse_existing_output(args.output_dir, "--output_dir", args.overwrite)
    tb = testbed.load()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hf-align-quickstart-")
    before = tb.mean_reward(num_prompts=args.eval_prompts)
    print(f"reward before: {before['mean_reward']:.3f}  (exact answers {before['exact_rate']:.1%})", flush=True)

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        max_steps=args.max_steps,
        beta=0.1,
        lr_scheduler_type="constant",
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    dataset = tb.preference_dataset(args.num_pairs)
    start = time.time()
    if args.method == "masked-dpo":
        from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

        mask = _warmup_mask(tb, dataset, common, args, output_dir)
        print(f"mask: {mask}", flush=True)
        config = MaskedDPOConfig(learning_rate=args.learning_rate or 2e-3, **common)
        trainer = MaskedDPOTrainer(
            model=tb.model, args=config, train_dataset=dataset, processing_class=tb.tokenizer, neuron_mask=mask
        )
    else:
        config = DPOConfig(learning_rate=args.learning_rate or 5e-4, **common)
        trainer = DPOTrainer(
            model=tb.model,
            ref_model=copy.deepcopy(tb.model),
            args=config,
            train_dataset=dataset,
            processing_class=tb.tokenizer,
        )
    trainer.train()
    trainer.save_model(output_dir)
    model = trainer.model
    after = tb.mean_reward(model=model, num_prompts=args.eval_prompts)
    print(f"reward after:  {after['mean_reward']:.3f}  (exact answers {after['exact_rate']:.1%})")
    print(
        f"trained {args.max_steps} steps in {time.time() - start:.0f}s with {args.method}; model saved to {output_dir}"
    )
    return {"before": before, "after": after, "output_dir": output_dir}
