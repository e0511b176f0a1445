"""``hf-align feedback``: feedback-conditioned training (ALT / Quark) with ``FeedbackConditionedTrainer``.

Online (``reward_funcs`` and/or ``feedback_fn`` set, by name ``'package.module:function'``; a reward entry can also
be ``testbed``, ``package.module.function`` or a reward-model folder, see :mod:`hf_align.rewards`): ``dataset_name`` holds the prompts to sample from (a ``prompt`` column; other
columns reach the reward functions as keyword arguments). The run lasts ``num_iterations × steps_per_iteration``
optimizer steps; leave ``max_steps`` unset or equal to that product.

Offline (neither set): ``dataset_name`` holds ``prompt``, ``completion`` and ``feedback`` columns (for quantiles,
``feedback`` is the score) and training is conditional SFT on it.
"""

from __future__ import annotations

from hf_align.cli.common import (
    load_dataset_any,
    load_model_and_tokenizer,
    make_trl_parser,
    require_columns,
    split,
    train_and_save,
)


def make_parser(prog: str | None = None, command: str = "feedback"):
    from hf_align.trainers import FeedbackConditionedConfig

    return make_trl_parser(FeedbackConditionedConfig, prog or f"hf-align {command}")


def run(script_args, training_args, model_args, command: str = "feedback") -> int:
    from trl import get_peft_config

    from hf_align.trainers import FeedbackConditionedTrainer

    source = f"dataset_name {script_args.dataset_name!r}"
    online = bool(training_args.reward_funcs) or bool(training_args.feedback_fn)
    if training_args.feedback_type != "quantile" and online and not training_args.feedback_fn:
        raise ValueError(
            f"feedback_type {training_args.feedback_type!r} needs feedback_fn ('package.module:function' returning "
            "a category or text per completion); reward_funcs only give scores."
        )
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
    train = split(dataset, script_args.dataset_train_split, source)
    if online:
        require_columns(train, ("prompt",), source)
    else:
        missing = [c for c in ("prompt", "completion", "feedback") if c not in train.column_names]
        if missing:
            raise ValueError(
                f"{source}: missing column(s) {missing}; found {train.column_names}. Without reward_funcs or "
                "feedback_fn the feedback command trains offline on prompt/completion/feedback rows; set "
                "reward_funcs or feedback_fn ('package.module:function') to sample and score online."
            )
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    trainer = FeedbackConditionedTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, training_args, script_args)
    return 0
