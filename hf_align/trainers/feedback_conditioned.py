"""Feedback-conditioned training: ALT (sauc-abadal/ALT) and Quark (GXimingLu/Quark) as one TRL-style trainer.

The policy learns ``p(completion | feedback, prompt)`` on its own samples, each prefixed with the
feedback it earned; at inference it is conditioned on the *best* feedback. Three feedback kinds:

* ``"quantile"`` (Quark, ALT_RM): scalar rewards → ``num_quantiles`` bins over the whole data pool,
  rendered as special tokens ``<|quantile_0|>`` … (0 = best) or as words (``"Excellent."`` …);
* ``"category"`` (ALT_LMC): ``feedback_fn`` returns one of ``categories`` (listed best first);
* ``"text"`` (ALT_LMU): ``feedback_fn`` returns free text, optionally ``(text, score)``.

Online loop (``train()``), one round every ``steps_per_round`` optimizer steps: draw prompts,
sample ``num_generations`` each (unconditioned in the first iteration, as ALT; then conditioned on
the best feedback), score them, add them to the :class:`~hf_align.data_pool.DataPool`, and train on
a balanced draw from the pool. The HF ``Trainer`` runs underneath (logging, checkpoints, accelerate):
its dataloader only yields placeholders and ``_prepare_inputs`` hands out the iteration's batches,
the pattern TRL's GRPO uses. The pool is saved into every checkpoint; every random draw of an
iteration is seeded by ``(seed, iteration)``, so a resumed run rebuilds exactly the same data.

Loss per generation token (prompt and feedback tokens are masked): NLL + ``beta`` ·
KL(πθ ‖ π_ref) − ``entropy_coef`` · H(πθ), averaged over the generation tokens of the batch. As in
Quark and ALT the reference sees the prompt *without* feedback (``ref_sees_feedback=False``).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, is_peft_model
from transformers import PreTrainedModel
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import get_config_model_id, pad

from hf_align import _compat
from hf_align.checkpoints import resolve_resume_checkpoint
from hf_align.data_pool import DataPool
from hf_align.errors import UserError
from hf_align.feedback_format import FeedbackFormat, add_quantile_tokens
from hf_align.generation import sample_token_ids, until_eos, vllm_generation
from hf_align.loading import load_model, load_tokenizer
from hf_align.losses import token_kl
from hf_align.rewards import (
    RewardFunc,
    as_score,
    call_user_function,
    check_reward_weights,
    check_signature,
    function_label,
    import_callable,
    resolve_reward_funcs,
    score_completions,
)
from hf_align.trainers._base import HFAlignTrainerMixin, global_token_count, prepare_reference
from hf_align.trainers._model_copy import reference_copy
from hf_align.trainers.feedback_conditioned_config import FeedbackConditionedConfig


POOL_DIR = "data_pool"
SAMPLED = ("prompt", "completion", "completion_ids")
"""Dataset columns reward functions do not get as such (GRPO's rule): the sampled values stand in their place."""


class FeedbackConditionedTrainer(HFAlignTrainerMixin, _BaseTrainer):
    """ALT / Quark: learn ``p(completion | feedback, prompt)`` from rewards, categories or text feedback.

    Args:
        model: a causal LM or its id/path.
        args: :class:`FeedbackConditionedConfig`.
        train_dataset: online: prompts (``prompt`` column; other columns go to reward functions as keyword
            arguments); offline (no ``reward_funcs``/``feedback_fn``): ``prompt``, ``completion``, ``feedback``
            columns (for quantiles ``feedback`` holds the score, binned over the dataset).
        reward_funcs: reward specs (:func:`hf_align.rewards.resolve_reward`: TRL-GRPO-style callables, import
            paths, reward models or their folders); their weighted sum is the score.
        feedback_fn: ``f(prompts, completions) -> list`` of a number (quantile), a category, a text or a
            ``(category|text, score)`` pair.
        ref_model: reference for the KL term; default a frozen copy of the initial policy (PEFT: adapters off).
        peft_config: wrap the model with PEFT after the quantile tokens are added.
    """

    _name = "FeedbackConditioned"  # tags and paper: the registry's "feedback" entry
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: FeedbackConditionedConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_funcs: RewardFunc | PreTrainedModel | str | list | None = None,
        feedback_fn: Callable[[list, list[str]], Sequence[Any]] | None = None,
        ref_model: PreTrainedModel | None = None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args if args is not None else FeedbackConditionedConfig(output_dir="feedback-conditioned")
        self.args = args  # read by the set-up steps (offline tokenization); Trainer.__init__ sets it again
        self.feedback_format = FeedbackFormat.from_args(args)
        model, tokenizer = self._setup_model(model, processing_class, args, peft_config)
        self._setup_feedback_sources(args, reward_funcs, feedback_fn)
        self.pool = DataPool(
            feedback_type=args.feedback_type,
            num_quantiles=args.num_quantiles,
            categories=args.categories,
            max_per_prompt=args.max_samples_per_prompt,
            keep=args.pool_keep,
            max_size=args.max_pool_size,
            seed=args.seed,
            quantile_rule=args.quantile_rule,
        )
        trainer_dataset, eval_dataset = self._setup_datasets(args, train_dataset, eval_dataset)
        self.ref_model = None
        if args.beta > 0 and not is_peft_model(model):
            self.ref_model = (ref_model if ref_model is not None else reference_copy(model)).eval()
            self.ref_model.requires_grad_(False)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.iteration_timings: list[dict[str, float]] = []
        self._buffer, self._buffer_iteration, self._buffer_position = [], -1, 0
        super().__init__(
            model=model,
            args=args,
            data_collator=self._collate,
            train_dataset=trainer_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._set_trainable_fraction()
        if self.ref_model is not None:
            self.ref_model = prepare_reference(self, self.ref_model)  # ZeRO-3 / FSDP: sharded like TRL's
        self._last_vllm_sync = -1
        self.vllm_generation = None
        if args.use_vllm:
            self.vllm_generation = vllm_generation(self.model, self.accelerator, self.processing_class, args)

    # ---- set-up steps --------------------------------------------------------------------------------

    def _setup_model(self, model, processing_class, args, peft_config):
        """Load model and tokenizer, give the quantile tokens embedding rows, then wrap with PEFT."""
        if isinstance(model, str):
            model = load_model(model)
        tokenizer = processing_class or load_tokenizer(get_config_model_id(model.config))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.feedback_tokens = add_quantile_tokens(
            model, tokenizer, self.feedback_format.tokens, args.seed, peft=peft_config is not None
        )
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self._processing = tokenizer  # the rendering helpers run before super().__init__ sets processing_class
        return model, tokenizer

    def _setup_feedback_sources(self, args, reward_funcs, feedback_fn) -> None:
        """Resolve reward functions (argument, else config names), their weights and the feedback function."""
        if reward_funcs is None and args.reward_funcs:
            reward_funcs = list(args.reward_funcs)
        self.reward_funcs, self.reward_func_names = resolve_reward_funcs(reward_funcs, "reward_funcs entry")
        self.reward_weights = check_reward_weights(args.reward_weights, len(self.reward_funcs))
        if feedback_fn is None and args.feedback_fn:
            feedback_fn = import_callable(args.feedback_fn, "feedback_fn entry")
            check_signature(feedback_fn, "feedback_fn", [], [], label=args.feedback_fn)
        elif feedback_fn is not None:
            check_signature(feedback_fn, "feedback_fn", [], [])
        self.feedback_fn = feedback_fn
        self.online = bool(self.reward_funcs) or feedback_fn is not None
        if args.feedback_type != "quantile" and self.online and feedback_fn is None:
            raise ValueError(f"feedback_type={args.feedback_type!r} needs a `feedback_fn`; reward_funcs give scores.")

    def _setup_datasets(self, args, train_dataset, eval_dataset):
        """Online: the prompt set and index placeholders for the HF dataloader (``max_steps`` fixed by the loop);
        offline: the tokenized feedback rows (which also fill the pool)."""
        if self.online:
            if train_dataset is None or "prompt" not in train_dataset.column_names:
                cols = None if train_dataset is None else train_dataset.column_names
                raise UserError(f"Online mode needs a train_dataset with a 'prompt' column (got columns {cols}).")
            if len(train_dataset) == 0:
                raise ValueError("train_dataset is empty: no prompts to sample from.")
            steps = args.num_rounds * args.steps_per_round
            if args.max_steps > 0 and args.max_steps != steps:
                raise ValueError(
                    f"max_steps={args.max_steps} contradicts num_rounds × steps_per_round = {steps}; "
                    "leave max_steps unset in online mode."
                )
            args.max_steps = steps
            self.prompt_dataset = train_dataset
            batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            trainer_dataset = range(steps * batch)  # indices only: the batches come from the pool
        else:
            if train_dataset is None:
                raise ValueError(
                    "Pass `reward_funcs`/`feedback_fn` (online) or a train_dataset with feedback (offline)."
                )
            self.prompt_dataset = None
            trainer_dataset = self._offline_features(train_dataset, "train_dataset")
        if eval_dataset is not None:
            eval_dataset = self._offline_features(eval_dataset, "eval_dataset", fill_pool=False)
        return trainer_dataset, eval_dataset

    # ---- rendering & tokenization ------------------------------------------------------------------------

    def render_feedback(self, row_or_bin: dict | int) -> str:
        """The feedback string of a pool row (or of a quantile bin index)."""
        return self.feedback_format.label(row_or_bin)

    def best_feedback(self) -> str:
        """What sampling (after iteration 1) and :meth:`generate` condition on by default."""
        return self.feedback_format.best(self.pool)

    def render_prompt(self, prompt: str | list[dict], feedback: str | None) -> str:
        """Conditioned prompt text (``feedback=None``: the unconditioned form)."""
        return self.feedback_format.render(prompt, feedback, self._processing)

    def _encode_prefix(self, text: str, conversational: bool) -> list[int]:
        return self._processing(text, add_special_tokens=not conversational)["input_ids"]

    def tokenize_example(self, prompt: str | list[dict], completion: str, feedback: str) -> dict[str, list[int]]:
        """``input_ids``/``labels`` (prefix masked with -100) and, when needed, the reference's unconditioned copy."""
        tokenizer, args = self._processing, self.args
        conversational = isinstance(prompt, list)
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prefix_ids = self._encode_prefix(self.render_prompt(prompt, feedback), conversational)
        example = _join(prefix_ids, completion_ids, args.max_length)
        if args.beta > 0 and not args.ref_sees_feedback:
            ref_prefix = self._encode_prefix(self.render_prompt(prompt, None), conversational)
            num_labels = sum(1 for label in example["labels"] if label != -100)
            ref = _join(ref_prefix, completion_ids[:num_labels], None)
            example["ref_input_ids"], example["ref_labels"] = ref["input_ids"], ref["labels"]
        return example

    def _collate(self, features: list) -> dict[str, torch.Tensor]:
        if features and not isinstance(features[0], dict):
            return {"placeholder": torch.tensor(features)}
        pad_id = self._processing.pad_token_id
        batch = {}
        for key, value in (("input_ids", pad_id), ("labels", -100), ("ref_input_ids", pad_id), ("ref_labels", -100)):
            if key not in features[0]:
                continue
            rows = [torch.tensor(f[key], dtype=torch.long) for f in features]
            batch[key] = pad(rows, padding_value=value)
            if key.endswith("input_ids"):
                mask = pad([torch.ones_like(r) for r in rows], padding_value=0)
                batch["attention_mask" if key == "input_ids" else "ref_attention_mask"] = mask
        return batch

    # ---- offline mode --------------------------------------------------------------------------------

    def _offline_features(self, dataset, name: str, fill_pool: bool = True) -> list[dict]:
        missing = {"prompt", "completion", "feedback"} - set(dataset.column_names)
        if missing:
            raise UserError(
                f"{name} is missing column(s) {sorted(missing)}: offline mode needs prompt, completion and feedback "
                "(or pass reward_funcs / feedback_fn for the online loop)."
            )
        pool = self.pool if fill_pool else copy.deepcopy(self.pool)
        pool.max_per_prompt = pool.max_size = None
        prompts, completions, feedback = dataset["prompt"], dataset["completion"], dataset["feedback"]
        completions = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        source = f"{name} column 'feedback'"
        if self.args.feedback_type == "quantile":
            pool.add(
                prompts, completions, scores=[as_score(v, i, source) for i, v in enumerate(feedback)], iteration=0
            )
        else:
            parsed = [self.feedback_format.parse(v, i, source) for i, v in enumerate(feedback)]
            pool.add(prompts, completions, feedback=[p[0] for p in parsed], scores=[p[1] for p in parsed], iteration=0)
        start = len(pool) - len(completions)
        rows = pool.rows(np.arange(start, len(pool)))
        return [self.tokenize_example(r["prompt"], r["completion"], self.render_feedback(r)) for r in rows]

    # ---- the online loop -----------------------------------------------------------------------------

    def _prepare_inputs(self, inputs):
        if not self.online or not self.model.training:
            return super()._prepare_inputs(inputs)
        spi = self.args.steps_per_round
        iteration = self.state.global_step // spi
        if iteration != self._buffer_iteration:
            self._close_iteration_timing()
            if self.pool.last_iteration < iteration:
                self.collect(iteration)
            self._buffer = self._draw_training_rows(iteration)
            self._buffer_iteration = iteration
            self._buffer_position = (self.state.global_step % spi) * self.args.gradient_accumulation_steps
            self._iteration_train_start = time.perf_counter()
        bs = self.args.per_device_train_batch_size
        start = (self._buffer_position * bs) % max(len(self._buffer), 1)
        self._buffer_position += 1
        return super()._prepare_inputs(self._collate(self._buffer[start : start + bs]))

    def collect(self, iteration: int) -> dict[str, float]:
        """Sample, score and add one round's generations to the pool (all processes get the same rows)."""
        args = self.args
        rng = np.random.default_rng([args.seed, iteration, 0])
        chosen = rng.choice(len(self.prompt_dataset), size=args.prompts_per_round, replace=True)
        local = chosen[self.accelerator.process_index :: self.accelerator.num_processes]
        rows = [self.prompt_dataset[int(i)] for i in local]
        prompts = [row["prompt"] for row in rows for _ in range(args.num_generations)]
        conditioned = iteration > 0 or not args.unconditioned_first_round
        feedback = self.best_feedback() if conditioned else None

        t0 = time.perf_counter()
        completions, completion_ids = self._sample(prompts, feedback, seed=args.seed * 100_003 + iteration)
        t1 = time.perf_counter()
        extra = (
            {k: [row[k] for row in rows for _ in range(args.num_generations)] for k in rows[0] if k not in SAMPLED}
            if rows
            else {}
        )
        labels, scores, per_func = self._score(prompts, completions, completion_ids=completion_ids, **extra)
        t2 = time.perf_counter()
        eos = self._processing.eos_token_id
        clipped = [not ids or ids[-1] != eos for ids in completion_ids]
        per_row = list(zip(*per_func)) if per_func else [()] * len(completions)
        # every rank's rows, in the order one process would add them (the pool's order decides its draws and ties)
        world, n = self.accelerator.num_processes, args.num_generations
        order = [(i * world + self.accelerator.process_index) * n + g for i in range(len(local)) for g in range(n)]
        local_rows = zip(order, prompts, completions, labels, scores, map(len, completion_ids), clipped, per_row)
        gathered = sorted(gather_object(list(local_rows)), key=lambda row: row[0])
        _, prompts, completions, labels, scores, lengths, clipped, per_row = (
            (list(col) for col in zip(*gathered)) if gathered else ([],) * 8
        )
        self._log_round(scores, per_row, lengths, clipped)
        if args.feedback_type == "quantile" and None in scores:  # GRPO: a row no reward function scored
            keep = [s is not None for s in scores]
            warnings.warn(
                f"Round {iteration}: no reward function scored {keep.count(False)} of {len(keep)} completions (all "
                "returned None); they stay out of the pool (a quantile needs a score).",
                stacklevel=2,
            )
            prompts, completions, labels, scores, lengths = (
                [v for v, k in zip(col, keep) if k] for col in (prompts, completions, labels, scores, lengths)
            )
        self.pool.add(prompts, completions, feedback=labels, scores=scores, iteration=iteration, lengths=lengths)
        t3 = time.perf_counter()
        finite = [s for s in scores if s is not None and math.isfinite(s)]
        stats = {
            "iteration": iteration,
            "sampling_s": t1 - t0,
            "feedback_s": t2 - t1,
            "pool_add_s": t3 - t2,
            "mean_score": float(np.mean(finite)) if finite else float("nan"),
            "pool_size": len(self.pool),
            "conditioned": conditioned,
        }
        self.iteration_timings.append(stats)
        self._log_pool(stats)
        return stats

    def _log_round(self, scores: list, per_row: list[tuple], lengths: list[int], clipped: list[bool]) -> None:
        """GRPO's names for what one round sampled: ``reward``, ``reward_std``, ``rewards/<name>/mean|std`` and
        ``completions/*`` (all processes' rows; ``std`` unbiased, NaN-aware, as GRPO's ``nanstd``)."""
        metrics = self._metrics
        metrics["train/reward"].append(_nanmean(scores))
        metrics["train/reward_std"].append(_nanstd(scores))
        for name, values in zip(self.reward_func_names, zip(*per_row)):
            metrics[f"train/rewards/{name}/mean"].append(_nanmean(values))
            metrics[f"train/rewards/{name}/std"].append(_nanstd(values))
        if lengths:
            metrics["train/completions/mean_length"].append(float(np.mean(lengths)))
            metrics["train/completions/min_length"].append(float(np.min(lengths)))
            metrics["train/completions/max_length"].append(float(np.max(lengths)))
            metrics["train/completions/clipped_ratio"].append(float(np.mean(clipped)))

    def _log_pool(self, stats: dict) -> None:
        """The feedback-specific numbers: pool size, rows per feedback group (bin 0 / first category = best) and the
        round's timings."""
        metrics = self._metrics
        metrics["train/pool/size"].append(float(len(self.pool)))
        if len(self.pool) and (self.args.feedback_type != "text" or not np.isnan(self.pool.score).any()):
            kind = "category" if self.args.feedback_type == "category" else "quantile"
            groups = len(self.args.categories) if kind == "category" else self.args.num_quantiles
            for i, count in enumerate(np.bincount(self.pool.groups(), minlength=groups)[:groups]):
                metrics[f"train/pool/{kind}_{i}"].append(float(count))
        for key in ("sampling_s", "feedback_s"):
            metrics[f"train/round/{key}"].append(float(stats[key]))

    def _draw_training_rows(self, iteration: int) -> list[dict]:
        args = self.args
        t0 = time.perf_counter()
        world = self.accelerator.num_processes
        total = args.steps_per_round * args.gradient_accumulation_steps * args.per_device_train_batch_size * world
        index = self.pool.sample(
            total,
            balance=args.balance_feedback,
            balance_lengths=args.balance_lengths,
            rng=np.random.default_rng([args.seed, iteration, 1]),
            num_length_buckets=args.num_length_buckets,
        )
        rows = self.pool.rows(index[self.accelerator.process_index :: world])
        features = [self.tokenize_example(r["prompt"], r["completion"], self.render_feedback(r)) for r in rows]
        if self.iteration_timings and self.iteration_timings[-1]["iteration"] == iteration:
            self.iteration_timings[-1]["pool_sample_s"] = time.perf_counter() - t0
        return features

    def _close_iteration_timing(self) -> None:
        if self.iteration_timings and hasattr(self, "_iteration_train_start"):
            last = self.iteration_timings[-1]
            last.setdefault("training_s", time.perf_counter() - self._iteration_train_start)

    def score(self, prompts: list, completions: list, **columns) -> tuple[list, list[float | None]]:
        """Feedback labels (None for pure rewards) and scores; errors name the function and the offending row."""
        return self._score(prompts, completions, **columns)[:2]

    def _score(self, prompts: list, completions: list, **columns) -> tuple[list, list[float | None], list[list]]:
        """:meth:`score` plus each reward function's own rewards. Reward functions are called as TRL's GRPO calls
        them (conversational completions as messages; ``trainer_state``, ``log_metric``, ``log_extra`` and the
        dataset's columns as keyword arguments); ``feedback_fn`` gets ``(prompts, completion texts)``."""
        if self.feedback_fn is None:
            if prompts and isinstance(prompts[0], list):
                completions = [
                    c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions
                ]
            grpo_kwargs = {"trainer_state": self.state, "log_metric": self._log_metric, "log_extra": _ignore_extra}
            totals, per_func = score_completions(
                self.reward_funcs, prompts, completions, self.reward_func_names, self.reward_weights,
                **{**grpo_kwargs, **columns},
            )  # fmt: skip
            return [None] * len(completions), totals, per_func
        outputs = call_user_function(self.feedback_fn, "feedback_fn", prompts, completions)
        source = f"feedback_fn {function_label(self.feedback_fn)!r}"
        if len(outputs) != len(completions):
            raise ValueError(f"{source} returned {len(outputs)} values for {len(completions)} completions.")
        if self.args.feedback_type == "quantile":
            return [None] * len(outputs), [as_score(v, i, source) for i, v in enumerate(outputs)], []
        parsed = [self.feedback_format.parse(v, i, source) for i, v in enumerate(outputs)]
        return [p[0] for p in parsed], [p[1] for p in parsed], []

    def _log_metric(self, name: str, value: float) -> None:
        """GRPO's ``log_metric`` for reward functions: averaged over each logging step, logged under ``name``."""
        self._metrics[f"train/{name}"].append(float(value))

    # ---- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _sample(
        self, prompts: list, feedback: str | list[str] | None, seed: int, **overrides
    ) -> tuple[list[str], list[list[int]]]:
        """One completion per prompt: decoded (special tokens removed) and its ids (up to and including EOS)."""
        args = self.args
        feedbacks = feedback if isinstance(feedback, list) else [feedback] * len(prompts)
        encoded = [
            self._encode_prefix(self.render_prompt(p, f), isinstance(p, list)) for p, f in zip(prompts, feedbacks)
        ]
        tokenizer, accelerator = self._processing, self.accelerator
        if self.vllm_generation is not None:
            if self._last_vllm_sync != self.state.global_step:
                self.vllm_generation.sync_weights()
                self._last_vllm_sync = self.state.global_step
            _, generated, _, _ = self.vllm_generation.generate(prompts=encoded, images=None, num_generations=1)
            ids = [until_eos(list(c), tokenizer.eos_token_id, tokenizer.pad_token_id) for c in generated]
        else:
            settings = {
                "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
                "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.max_completion_length,
                **(args.generation_kwargs or {}),
            }  # fmt: skip
            with unwrap_model_for_generation(self.model_wrapped, accelerator) as unwrapped:
                ids = sample_token_ids(
                    unwrapped, encoded, tokenizer.pad_token_id, tokenizer.eos_token_id,
                    seed=seed + accelerator.process_index, batch_size=args.generation_batch_size,
                    device=accelerator.device, progress=not args.disable_tqdm and accelerator.is_main_process,
                    **{**settings, **overrides},
                )  # fmt: skip
        return [tokenizer.decode(i, skip_special_tokens=True) for i in ids], ids

    # ---- model card: how to condition generation on the best feedback --------------------------------------

    def _card_conditioning(self) -> tuple[str | None, bool]:
        """The best feedback (None while a text pool is empty) and whether prompts go through the chat template
        (the training prompts were message lists)."""
        try:
            best = self.feedback_format.best(self.pool)
        except (ValueError, IndexError):
            best = None
        prompts = list(self.pool.prompt[:1])
        if not prompts and self.prompt_dataset is not None and len(self.prompt_dataset):
            prompts = [self.prompt_dataset[0]["prompt"]]
        return best, bool(prompts) and not isinstance(prompts[0], str)  # message lists: the chat template

    def card_sections(self, repo: str) -> list[str]:
        fmt = self.feedback_format
        best, chat = self._card_conditioning()
        template = fmt.chat_feedback_template if chat else fmt.feedback_template
        where = "the last user message, then the chat template" if chat else "the prompt text"
        lines = ["### Conditioning", "", f"Prompts are conditioned on feedback through {where}: `{template}`."]
        if best is not None:
            lines += [f"Generate with the best feedback, `{best}` (the quick start does)."]
        if fmt.tokens:
            lines += [f"Feedback tokens, best first: {', '.join(f'`{t}`' for t in fmt.tokens)}."]
        return [*lines, ""]

    def card_generate_snippet(self) -> str:
        """Python (after the quick start's ``model``/``tokenizer``) that generates conditioned on the best feedback."""
        fmt = self.feedback_format
        best, chat = self._card_conditioning()
        best = best if best is not None else "<feedback>"
        question = "Write a short answer."
        if chat:
            content = fmt.chat_feedback_template.format(feedback=best, prompt=question)
            build = (
                f"messages = [{{'role': 'user', 'content': {content!r}}}]\n"
                "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
                'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)\n'
            )
        else:
            build = (
                f"prompt = {fmt.feedback_template.format(feedback=best, prompt=question)!r}"
                "  # the best feedback, then the prompt\n"
                'inputs = tokenizer(prompt, return_tensors="pt")\n'
            )
        return (
            build + "output = model.generate(**inputs, max_new_tokens=32)\n"
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))'
        )

    def generate(
        self,
        prompts: list,
        feedback: str | int | list | None = None,
        unconditioned: bool = False,
        **generate_kwargs,
    ) -> list[str]:
        """Completions conditioned on ``feedback`` (default: the best feedback; an int = that quantile bin).

        ``unconditioned=True`` samples from the prompt without any feedback (the form the first iteration samples
        and the reference sees): the baseline to compare the conditioned samples with.
        ``generate_kwargs`` override the sampling settings, e.g. ``do_sample=False`` for greedy decoding.
        """
        seed = generate_kwargs.pop("seed", self.args.seed)
        if unconditioned:
            if feedback is not None:
                raise ValueError("generate(): pass either feedback or unconditioned=True, not both.")
            return self._sample(list(prompts), None, seed=seed, **generate_kwargs)[0]
        feedback = self.feedback_format.conditioning(feedback, self.pool)
        return self._sample(list(prompts), feedback, seed=seed, **generate_kwargs)[0]

    # ---- loss ----------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        logps = F.log_softmax(logits[:, :-1].float(), dim=-1)[mask]  # (generation tokens, vocab)
        targets = labels[mask]
        count = global_token_count(self, mask)  # every process's tokens: as one process
        num_tokens = count if count is not None else max(targets.numel(), 1)
        nll = -logps.gather(-1, targets[:, None]).squeeze(-1).sum() / num_tokens
        loss = nll
        mode = "train" if model.training else "eval"
        self._metrics[f"{mode}/nll"].append(nll.item())
        if self.args.beta > 0:
            ref_logps = self._reference_logps(inputs)
            kl = token_kl(logps, ref_logps).sum() / num_tokens
            loss = loss + self.args.beta * kl
            self._metrics[f"{mode}/kl"].append(kl.item())
        if self.args.entropy_coef > 0:
            entropy = -(logps.exp() * logps).sum(-1).sum() / num_tokens
            loss = loss - self.args.entropy_coef * entropy
            self._metrics[f"{mode}/entropy"].append(entropy.item())
        return (loss, logits) if return_outputs else loss

    @torch.no_grad()
    def _reference_logps(self, inputs) -> torch.Tensor:
        """Reference log-probs at the generation tokens (same order as the policy's)."""
        key = "ref_" if "ref_input_ids" in inputs else ""
        input_ids, attention = inputs[f"{key}input_ids"], inputs[f"{key}attention_mask"]
        if self.ref_model is not None:
            logits = self.ref_model(input_ids=input_ids, attention_mask=attention).logits
        else:
            unwrapped = self.accelerator.unwrap_model(self.model)
            with unwrapped.disable_adapter():
                logits = self.model(input_ids=input_ids, attention_mask=attention).logits
        mask = inputs[f"{key}labels"][:, 1:] != -100
        return F.log_softmax(logits[:, :-1].float(), dim=-1)[mask]

    # ---- logging, checkpoints, resume --------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for key, values in list(self._metrics.items()):
            if values and key.startswith(f"{mode}/"):
                name = key.split("/", 1)[1]
                logs[f"eval_{name}" if mode == "eval" else name] = float(np.mean(values))
                self._metrics[key] = []
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self.pool.save(os.path.join(_compat.checkpoint_folder(self, trial), POOL_DIR))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and len(self.pool) and not getattr(self, "_in_checkpoint", False):
            self.pool.save(os.path.join(output_dir or self.args.output_dir, POOL_DIR))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Run the loop; ``resume_from_checkpoint`` also restores the data pool saved in that checkpoint."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint:
            pool_dir = Path(resume_from_checkpoint) / POOL_DIR
            if self.online and not pool_dir.exists():
                raise FileNotFoundError(
                    f"Checkpoint {str(resume_from_checkpoint)!r} has no {POOL_DIR}/ to resume the pool from."
                )
            if pool_dir.exists():
                self.pool = DataPool.load(pool_dir)
                self._buffer_iteration = -1
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._close_iteration_timing()
        return output


# ---- helpers ---------------------------------------------------------------------------------------------


def _ignore_extra(column: str, values: list) -> None:
    """GRPO's ``log_extra`` (extra columns of its completions table): accepted, and dropped -- no table here."""


def _nanmean(values) -> float:
    given = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(np.nanmean(given)) if (~np.isnan(given)).any() else float("nan")


def _nanstd(values) -> float:
    """Unbiased standard deviation over the values that are not None/NaN (TRL's ``nanstd``); NaN below two."""
    given = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    given = given[~np.isnan(given)]
    return float(given.std(ddof=1)) if given.size > 1 else float("nan")


def _join(prefix: list[int], completion: list[int], max_length: int | None) -> dict[str, list[int]]:
    input_ids = prefix + completion
    labels = [-100] * len(prefix) + completion
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}
