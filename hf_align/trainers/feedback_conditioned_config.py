"""``FeedbackConditionedConfig``: the options of :class:`~hf_align.trainers.FeedbackConditionedTrainer` (ALT, Quark),
in a file of its own as TRL keeps ``grpo_config.py`` beside ``grpo_trainer.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl.trainer.base_config import _BaseConfig

from hf_align.config_checks import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    move_renamed_fields,
    option,
    prefixed_dataclass,
)
from hf_align.data_pool import PoolOptions
from hf_align.feedback_format import FeedbackFormat
from hf_align.trainers._base import PlotArguments


RENAMED_FIELDS = {
    "kl_coef": "beta",
    "max_new_tokens": "max_completion_length",
    "num_iterations": "num_rounds",
    "steps_per_iteration": "steps_per_round",
    "prompts_per_iteration": "prompts_per_round",
    "unconditioned_first_iteration": "unconditioned_first_round",
}
"""Old → new :class:`FeedbackConditionedConfig` names (GRPO's where the concept is GRPO's); the old ones go in the
next release."""


FeedbackArguments = prefixed_dataclass(
    "FeedbackArguments", FeedbackFormat, "", __name__, doc="FeedbackFormat's fields (declared there, once)."
)
PoolArguments = prefixed_dataclass(
    "PoolArguments", PoolOptions, "", __name__, doc="DataPool's choices (declared in hf_align.data_pool.PoolOptions)."
)


@dataclass
class FeedbackConditionedConfig(PlotArguments, FeedbackArguments, PoolArguments, _BaseConfig):
    """Configuration of :class:`FeedbackConditionedTrainer` (ALT / Quark). Recipes map 1:1 onto these fields.

    On TRL's base config like every other hf-align trainer (``logging_steps=10``, ``bf16`` on unless ``fp16``,
    gradient checkpointing on).
    """

    # ---- loss -----------------------------------------------------------------------------------------
    beta: float = option(
        0.05,
        help="KL coefficient (GRPO's name; was kl_coef): weight of the token-level KL(policy || reference) on "
        "generation tokens. 0 loads no reference model.",
        range=NON_NEGATIVE,  # a KL weight may be 0 (DPO's beta may not)
    )
    entropy_coef: float = option(
        0.0, help="Weight of the entropy bonus (subtracted from the loss); 0 disables it.", range=NON_NEGATIVE
    )
    ref_sees_feedback: bool = field(
        default=False,
        metadata={
            "help": "Feed the reference the feedback-conditioned prompt. False (Quark, ALT): the reference sees the "
            "prompt without feedback."
        },
    )
    max_length: int | None = option(
        512, help="Truncate training sequences (prompt + feedback + completion) to this length.", range=AT_LEAST_ONE
    )
    # ---- online loop ----------------------------------------------------------------------------------
    num_rounds: int = option(
        5,
        help="Sample → feedback → pool → train rounds (was num_iterations, which in GRPO means the passes over each "
        "generation batch).",
        range=AT_LEAST_ONE,
    )
    prompts_per_round: int = option(
        64, help="Prompts drawn (with replacement) from the prompt dataset each round.", range=AT_LEAST_ONE
    )
    num_generations: int = option(4, help="Completions sampled per prompt each round.", range=AT_LEAST_ONE)
    steps_per_round: int = option(100, help="Optimizer steps on the pool per round.", range=AT_LEAST_ONE)
    unconditioned_first_round: bool = field(
        default=True, metadata={"help": "Sample the first round without feedback (ALT) instead of best_feedback."}
    )
    max_completion_length: int = option(
        64, help="Maximum generated tokens per completion (GRPO's name; was max_new_tokens).", range=AT_LEAST_ONE
    )
    temperature: float = option(1.0, help="Sampling temperature.", range=POSITIVE)
    top_p: float = option(1.0, help="Nucleus sampling threshold (1.0 = off).", range=FRACTION)
    top_k: int = option(0, help="Top-k sampling (0 = off).", range=NON_NEGATIVE)
    min_p: float | None = option(
        None, help="Minimum token probability, scaled by the most likely token's (None = off).", range=UNIT
    )
    repetition_penalty: float = option(
        1.0, help="Penalty (>1) or bonus (<1) for tokens already in prompt and completion.", range=POSITIVE
    )
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "More keyword arguments for generate() (or vLLM's SamplingParams), as in GRPO; they override "
            "the settings above. A JSON string on the command line."
        },
    )
    generation_batch_size: int = option(64, help="Prompts per HF generate() call.", range=AT_LEAST_ONE)
    use_vllm: bool = field(
        default=False, metadata={"help": "Sample with vLLM through TRL's VLLMGeneration (needs `pip install vllm`)."}
    )
    vllm_mode: str = field(default="colocate", metadata={"help": "vLLM mode: 'colocate' or 'server' (as in GRPO)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU memory share of vLLM in colocate mode."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward sources by name (used when the trainer gets no `reward_funcs` argument): "
            "'package.module:function' for a TRL-style callable, anything else a reward model id/path."
        },
    )
    feedback_fn: str | None = field(
        default=None,
        metadata={
            "help": "Feedback function by name, 'package.module:function' (used when the trainer gets no "
            "`feedback_fn` argument): returns a category, a text or (category|text, score) per completion."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions (default: all 1); the score is the sum."}
    )
    # ---- data pool ------------------------------------------------------------------------------------
    max_samples_per_prompt: int | None = option(
        None, help="Keep at most this many pool rows per prompt (None = unbounded).", range=AT_LEAST_ONE
    )
    max_pool_size: int | None = option(
        None, help="Keep at most this many pool rows overall (oldest dropped first).", range=AT_LEAST_ONE
    )
    balance_feedback: bool = field(
        default=True, metadata={"help": "Draw training rows equally from every feedback group (bin/category)."}
    )
    balance_lengths: bool = field(
        default=False,
        metadata={
            "help": "Rejection-sample so every feedback group has the same generation-length distribution (ALT)."
        },
    )
    num_length_buckets: int = option(
        8, help="Length buckets (pool-wide quantile edges) used by balance_lengths.", range=AT_LEAST_ONE
    )
    # ---- TRL base-config defaults this trainer keeps as they were ----------------------------------------
    bf16: bool | None = field(
        default=False,
        metadata={
            "help": "bf16 mixed precision. Off by default (unlike TRL's base config): the KL reference is then the "
            "fp32 initial policy exactly, and sampled pools do not change with autocast. None = on unless fp16."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: reward functions receive them as keyword arguments."}
    )
    # ---- deprecated names (one release): the value moves to the new field with a FutureWarning ------------------
    kl_coef: float | None = option(None, help="Deprecated: use beta.", range=NON_NEGATIVE)
    max_new_tokens: int | None = option(None, help="Deprecated: use max_completion_length.", range=AT_LEAST_ONE)
    num_iterations: int | None = option(
        None, help="Deprecated: use num_rounds (GRPO's num_iterations means something else).", range=AT_LEAST_ONE
    )
    steps_per_iteration: int | None = option(None, help="Deprecated: use steps_per_round.", range=AT_LEAST_ONE)
    prompts_per_iteration: int | None = option(None, help="Deprecated: use prompts_per_round.", range=AT_LEAST_ONE)
    unconditioned_first_iteration: bool | None = field(
        default=None, metadata={"help": "Deprecated: use unconditioned_first_round."}
    )

    _VALID_DICT_FIELDS = _BaseConfig._VALID_DICT_FIELDS + ["generation_kwargs"]

    def __post_init__(self):
        move_renamed_fields(self, RENAMED_FIELDS)
        super().__post_init__()
        FeedbackFormat.from_args(self)  # checks feedback_type, bins, words, categories and templates
