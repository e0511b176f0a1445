"""``hf-align quickstart``: see alignment happen on a laptop CPU in a minute.

Default (``--method masked-dpo``, ALLO in miniature): a short warm-up DPO with ``MaskAccumulationCallback`` scores
every decoder row by its accumulated gradient, ``NeuronMask.from_scores`` keeps the top 10 %, and
``MaskedDPOTrainer`` aligns the embedded testbed model training only those rows. ``--method dpo`` runs plain
``trl.DPOTrainer`` instead. Prints the mean reward of the model's samples before and after. Offline; writes only
under ``--output_dir``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass

from hf_align.config_checks import AT_LEAST_ONE, FRACTION, CheckedConfig, option


@dataclass
class QuickstartArguments(CheckedConfig):
    """The quickstart's knobs (defaults: the README's numbers)."""

    method: str = option(
        "masked-dpo",
        help="masked-dpo: warm-up scores + MaskedDPOTrainer on the top rows (ALLO); dpo: plain trl.DPOTrainer.",
        choices=("masked-dpo", "dpo"),
    )
    max_steps: int = option(60, help="Optimizer steps of the alignment run.", range=AT_LEAST_ONE)
    warmup_steps: int = option(20, help="Warm-up DPO steps that score the rows.", range=AT_LEAST_ONE)
    learning_rate: float | None = option(None, help="Defaults to a value tuned per method.")
    neuron_mask_ratio: float = option(0.1, help="Fraction of rows trained (masked-dpo).", range=FRACTION)
    num_pairs: int = option(512, help="Preference pairs generated from the testbed task.", range=AT_LEAST_ONE)
    eval_prompts: int = option(256, help="Prompts sampled to measure the reward.", range=AT_LEAST_ONE)
    output_dir: str | None = option(None, help="Where the aligned model goes (default: a temp dir).")
    overwrite: bool = option(False, help="Write into an --output_dir that is not empty.")
    seed: int = option(0, help="Training seed.")


def _warmup_mask(tb, dataset, common: dict, args: QuickstartArguments, output_dir: str):
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


def run(args: QuickstartArguments) -> dict:
    from trl import DPOConfig, DPOTrainer

    from hf_align import testbed
    from hf_align.cli.common import refuse_existing_output
    from hf_align.progress import progress_enabled

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
        activation_checkpointing=False,  # transformers' name (TRL's configs still default the old one)
        seed=args.seed,
        disable_tqdm=not progress_enabled(),  # the Trainer's own bar: minutes on a busy machine
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


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    (args,) = parse_command("hf-align quickstart", (QuickstartArguments,), argv, description=__doc__)
    run(args)
    return 0
