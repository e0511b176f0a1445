"""Negative preference optimization (NPO): make the model forget completions, token by token if asked.

``NPOTrainer`` is ``trl.SFTTrainer``'s data and model machinery (prompt-completion tokenization, standard or
conversational data, PEFT, the fused LM head that returns per-token log-probs without materializing logits) with the
NPO loss in ``compute_loss``. Losses (``y`` the forget completion, ``w_t`` its token weights, 1 by default):

* ``npo_loss_type="npo"``, ``npo_level="sequence"`` (Zhang et al. 2024, arXiv 2404.05868), per example
  ``r = Σ_t w_t (log πθ(y_t|·) − log π_ref(y_t|·))`` and ``L = −(2/β) · log σ(−β · r)``, averaged over the batch.
  At initialization (πθ = π_ref) the loss is exactly ``2·ln 2 / β``; as β → 0 it tends to gradient ascent.
* ``npo_loss_type="npo"``, ``npo_level="token"`` (ALLO's forgetting stage, RUCAIBox/ALLO ``train/train_forgetting.py``):
  ``ℓ_t = −w_t · log σ(−β (log πθ(y_t|·) − log π_ref(y_t|·)))``; ``L = Σ_t ℓ_t / #{t : w_t ≠ 0}`` where, as in ALLO,
  both sums run over the whole micro-batch (not per example).
* ``npo_loss_type="simnpo"`` (Fan et al. 2024, arXiv 2410.07163), reference-free and length-normalized:
  ``L = −(2/β) · log σ(−(β/|y|) · Σ_t w_t log πθ(y_t|·) − γ)`` with ``|y| = Σ_t w_t`` (the length when w ≡ 1),
  averaged over the batch.

Optional retain term on ``retain_dataset`` (added as ``retain_weight · L_retain``): ``retain_loss_type="nll"``
(mean NLL per retain completion token) or ``"kl"`` (``KL(π_ref ‖ πθ)`` over the vocabulary, mean per retain
completion token). Retain batches are drawn deterministically from the training step (see ``NPOTrainer``), so
resuming from a checkpoint sees the same retain batches as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from trl import SFTConfig, SFTTrainer
from trl.models import prepare_deepspeed
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, pad

from hf_align import _compat
from hf_align.errors import UserError
from hf_align.losses import npo_sequence_loss, npo_token_loss, retain_kl, retain_nll, simnpo_loss
from hf_align.progress import progress_bar
from hf_align.token_weights import check_weight_columns, normalize_token_weights
from hf_align.trainers._base import (
    HFAlignTrainerMixin,
    global_token_count,
    prepare_reference,
    resolve_args,
)
from hf_align.trainers._data_checks import check_dataset, column_names, drop_truncated_away
from hf_align.trainers._masking import NeuronMaskTrainerMixin
from hf_align.trainers.npo_config import REF_COLUMN, NPOConfig
from hf_align.trainers.registry import LANGUAGE_MODELING


_PER_TOKEN_COLUMNS = ("input_ids", "labels", "token_weights", REF_COLUMN)


# --------------------------------------------------------------------------------------------------------------
# Data


FORGET_COLUMNS = (*LANGUAGE_MODELING, ("conversations",))  # after to_forget_format
"""Forget data as text (``conversations``: ShareGPT's from/value turns, converted by SFT); pre-tokenized data
(``input_ids``) and data read through a ``formatting_func`` are taken as ``trl.SFTTrainer`` takes them."""


def check_forget_dataset(dataset, formatting_func=None):
    """``dataset`` as NPO trains on it (preference pairs → their ``rejected``), checked before any model work: one
    of :data:`FORGET_COLUMNS`, or anything SFT prepares itself (``input_ids``; any columns a ``formatting_func``
    reads)."""
    if dataset is None:
        return None
    if formatting_func is not None:  # SFT formats first: the columns are the function's business
        check_dataset(dataset, "train_dataset (forget data)")
        return dataset
    dataset = to_forget_format(dataset)
    pretokenized = "input_ids" in column_names(dataset)  # SFT trains on input_ids and ignores text columns
    check_dataset(dataset, "train_dataset (forget data)", None if pretokenized else FORGET_COLUMNS)
    return dataset


def to_forget_format(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """A preference dataset whose ``rejected`` is the forget completion → prompt-completion (weights follow)."""
    names = column_names(dataset)
    if "rejected" not in names or "completion" in names:
        return dataset
    if "prompt" not in names:
        raise ValueError(
            f"Forget data as preference pairs (forget 'rejected') needs a 'prompt' column; found {names}."
        )
    dataset = dataset.remove_columns([c for c in ("chosen", "chosen_weights") if c in names])
    dataset = dataset.rename_column("rejected", "completion")
    if "rejected_weights" in names:
        dataset = dataset.rename_column("rejected_weights", "completion_weights")
    return dataset


@dataclass
class DataCollatorForWeightedLanguageModeling(DataCollatorForLanguageModeling):
    """TRL's language-modeling collator plus right-padded ``token_weights`` / ``ref_token_logps`` (aligned to labels)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for key in ("token_weights", REF_COLUMN):
            if key in examples[0]:
                rows = [torch.tensor(example[key], dtype=torch.float32) for example in examples]
                output[key] = pad(
                    rows, padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
                )
        return output


# --------------------------------------------------------------------------------------------------------------
# Trainer


class NPOTrainer(HFAlignTrainerMixin, NeuronMaskTrainerMixin, SFTTrainer):
    """Forget completions with NPO / SimNPO, optionally token-weighted, neuron-masked and with a retain term.

    Args (beyond ``trl.SFTTrainer``'s):
        ref_model: the reference policy. Without it the reference is, in this order: the dataset's
            ``ref_token_logps`` column or ``precompute_ref_log_probs`` (the policy at init, computed once); the model
            with its neuron deltas disabled (neuron mask); the model with its adapter disabled (PEFT); otherwise a copy
            loaded from ``model.config._name_or_path`` (as ``trl.DPOTrainer`` does). SimNPO needs none.
        train_dataset: forget examples, prompt-completion (standard or conversational), or a preference dataset whose
            ``rejected`` is the forget completion. ``completion_weights`` / ``rejected_weights`` carry token weights
            (``hf_align.token_weights`` conventions).
        retain_dataset: optional data to keep (prompt-completion or language modeling). For forget micro-batch ``k``
            (``k = global_step · gradient_accumulation_steps + micro-step``) each process takes the next
            ``retain_batch_size`` rows of a permutation of the retain set seeded by ``seed + cycle`` (a new
            permutation each pass over it). The draw depends only on ``k``, so resuming is exact.
        neuron_mask: a ``NeuronMask``, a directory, or None (then the config's mask fields), as ``MaskedDPOTrainer``.
    """

    _name = "NPO"  # tags and paper: the registry's "npo" entry
    extra_signature_columns = ("token_weights", REF_COLUMN)
    weighted_collator = (DataCollatorForLanguageModeling, DataCollatorForWeightedLanguageModeling)
    loss_is_scaled_for_ga = False  # a per-micro-batch mean, like DPO's; Trainer averages over accumulation steps

    def __init__(
        self,
        model: str | torch.nn.Module,
        ref_model: torch.nn.Module | None = None,
        args: NPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset] | None = None,
        processing_class=None,
        *,
        retain_dataset: Dataset | None = None,
        neuron_mask=None,
        peft_config=None,
        **kwargs,
    ):
        # SFT decides completion-only loss from the raw columns: give it the forget view (prompt + completion).
        # Checked before any model is loaded: bad data costs nothing.
        train_dataset = check_forget_dataset(train_dataset, kwargs.get("formatting_func"))
        args = resolve_args(args, NPOConfig, SFTConfig, model, self._name, training_arguments=True)
        if kwargs.get("compute_loss_func") is not None:
            raise UserError("compute_loss_func: NPOTrainer computes the NPO loss itself; subclass and override it.")
        second_forward = retain_dataset is not None  # the retain term: a second forward with gradients per step
        model, ref_model = self._load_and_mask(
            model,
            ref_model,
            args,
            neuron_mask,
            peft_config,
            kwargs,
            deltas_reference=False,
            second_forward=second_forward,
        )  # NPO chooses its own reference (``_choose_reference``)

        self._init_library_trainer(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self._use_weighted_collator()
        if args.disable_dropout:
            disable_dropout_in_model(self.model)

        self.retain_dataset = self._prepare_retain_dataset(retain_dataset)
        self._retain_position = (-1, 0)  # (global step, micro-step within it)
        self._retain_perm: tuple[int, torch.Tensor] | None = None

        self.ref_model, self._precompute_engine = None, None
        self._ref_mode = self._choose_reference(ref_model)
        if args.precompute_ref_log_probs and self._needs_ref_for_forget():
            self.train_dataset = self._precompute_ref(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute_ref(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref(self.eval_dataset, "eval")
            self._precompute_engine = None
            if ref_model is None and self._ref_mode in ("policy", "model") and not self._live_ref_needed():
                self.ref_model, self._ref_mode = None, "none"  # the policy at init (or FSDP's stand-in) is done
        self._set_trainable_fraction()

    # ----------------------------------------------------------------------------------------------------------
    # Reference

    def _needs_ref_for_forget(self) -> bool:
        return self.args.npo_loss_type == "npo"

    def _live_ref_needed(self) -> bool:
        """A reference forward during training: for the forget term without precomputed values, or the KL retain."""
        in_data = self.train_dataset is not None and REF_COLUMN in (self.train_dataset.column_names or [])
        forget = self._needs_ref_for_forget() and not in_data
        return forget or (self.retain_dataset is not None and self.args.retain_loss_type == "kl")

    def _choose_reference(self, ref_model) -> str:
        """The reference mode (class docstring order); a separate model is loaded and prepared as DPOTrainer does."""
        if ref_model is not None:
            self.ref_model = self._prepare_ref_model(ref_model)
            return "model"
        if not self._live_ref_needed() and not self.args.precompute_ref_log_probs:
            return "none"
        if self.neuron_mask is not None:
            return "deltas_off"
        if is_peft_model(self.model):
            return "adapter_off"
        kl_retain = self.retain_dataset is not None and self.args.retain_loss_type == "kl"
        # FSDP shards the policy only in `train`: as DPOTrainer, precompute with a copy (dropped once done).
        if self.args.precompute_ref_log_probs and not kl_retain and not self.is_fsdp_enabled:
            return "policy"  # valid only before the first update: used for precomputing, then dropped
        from trl.trainer.utils import get_config_model_id

        from hf_align.trainers._base import load_model

        policy = self.accelerator.unwrap_model(self.model)  # reloaded as TRL builds a reference (a GGUF too)
        self.ref_model = self._prepare_ref_model(
            load_model(get_config_model_id(policy.config), self.args, like=policy)
        )
        return "model"

    def _prepare_ref_model(self, ref_model):
        """Dropout off, fused LM head, frozen, then placed (and sharded) for inference exactly as DPOTrainer's."""
        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(ref_model)
        ref_model.requires_grad_(False)
        return prepare_reference(self, ref_model)

    @contextlib.contextmanager
    def _reference_context(self, policy: torch.nn.Module | None = None):
        """Yields the module whose forward is the reference policy (``policy``: what runs the policy's forward)."""
        policy = self.model if policy is None else policy
        if self._ref_mode == "model":
            yield self.ref_model
        elif self._ref_mode == "deltas_off":
            from hf_align.trainers._masking import DeltasOffReference

            yield DeltasOffReference(policy)  # built per call: it follows `self.model` when Trainer wraps it
        elif self._ref_mode == "adapter_off":
            with self.accelerator.unwrap_model(self.model).disable_adapter():
                yield policy
        elif self._ref_mode == "policy":
            yield policy
        else:
            raise RuntimeError("This NPO configuration has no live reference policy.")

    @staticmethod
    def _model_inputs(inputs: dict) -> dict:
        return {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}

    def _reference_log_probs(self, inputs: dict, policy: torch.nn.Module | None = None) -> torch.Tensor:
        """Per-token reference log-probs ``(B, L-1)``, 0 off the labels; autocast as in training even when precomputed."""
        with torch.no_grad(), self.accelerator.autocast(), self._reference_context(policy) as reference:
            out = reference(**self._model_inputs(inputs), labels=inputs["labels"], fused_lm_head=True, use_cache=False)
        return out.log_probs[:, -(inputs["labels"].size(1) - 1) :]

    def _reference_logits(self, inputs: dict) -> torch.Tensor:
        with torch.no_grad(), self._reference_context() as reference:
            return reference(**self._model_inputs(inputs), use_cache=False).logits

    def _precompute_ref(self, dataset: Dataset, name: str) -> Dataset:
        """Add ``ref_token_logps`` as ``DPOTrainer._precompute_ref_logps`` does: a dataloader sharded by accelerate,
        each rank's rows (padded to a common length) gathered in dataset order, so every rank gets the whole column."""
        if not isinstance(dataset, Dataset):
            raise ValueError("precompute_ref_log_probs needs a map-style `datasets.Dataset`, not an IterableDataset.")
        if REF_COLUMN in dataset.column_names:
            return dataset
        columns = [c for c in ("input_ids", "labels") if c in dataset.column_names]
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        workers, pin = self.args.dataloader_num_workers, self.args.dataloader_pin_memory
        data = dataset.select_columns(columns)
        loader = DataLoader(data, batch_size, collate_fn=self.data_collator, num_workers=workers, pin_memory=pin)
        loader = self.accelerator.prepare(loader)  # sharded over the processes, in order (no shuffling)
        policy, was_training = self.model, self.model.training
        # As DPO: under DeepSpeed an inference engine (built once) places the parameters (ZeRO-3: gathers them).
        if self.is_deepspeed_enabled and self._ref_mode != "model":
            policy = self._precompute_engine = self._precompute_engine or prepare_deepspeed(policy, self.accelerator)
        self.model.eval()
        rows: list[list[float]] = []
        try:
            bar = progress_bar(
                loader, desc=f"reference log-probs ({name})", unit="batch", enabled=not self.args.disable_tqdm
            )
            for batch in bar:
                logps = self.accelerator.pad_across_processes(self._reference_log_probs(batch, policy).float(), dim=1)
                logps, lengths = self.accelerator.gather_for_metrics((logps, batch["attention_mask"].sum(dim=1)))
                rows.extend([0.0, *logps[i, : n - 1].tolist()] for i, n in enumerate(lengths.tolist()))
        finally:
            self.model.train(was_training)
        return dataset.add_column(REF_COLUMN, rows)

    # ----------------------------------------------------------------------------------------------------------
    # Data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """SFT's tokenization (no truncation yet), then per-token weights checked per row, then truncation."""
        if formatting_func is None:  # a formatting function reads the columns as given
            dataset = to_forget_format(dataset)
        names = column_names(dataset)
        present = check_weight_columns(names, allowed=("completion_weights",))
        untruncated = copy.copy(args)
        untruncated.max_length, untruncated.shuffle_dataset = None, False
        dataset = super()._prepare_dataset(
            dataset, processing_class, untruncated, False, formatting_func, dataset_name
        )
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        if present:
            kw = dict(column="completion_weights", eos_token_id=_compat.training_tokenizer(self).eos_token_id)
            kw["eos_token_weight"] = args.eos_token_weight

            def expand(example, index):
                labels = example["labels"]
                completion_ids = [t for t in labels if t != -100]
                if len(completion_ids) == len(labels):
                    raise ValueError(
                        "Token weights need prompt-completion data with completion_only_loss (labels -100 on the "
                        "prompt); this example has no prompt tokens."
                    )
                weights = iter(normalize_token_weights(example["completion_weights"], completion_ids, row=index, **kw))
                return {"token_weights": [0.0 if t == -100 else next(weights) for t in labels]}

            dataset = dataset.map(expand, with_indices=True, remove_columns=["completion_weights"], **map_kwargs)
        if REF_COLUMN in names:
            bad = dataset.filter(lambda ex: len(ex[REF_COLUMN]) != len(ex["input_ids"]), **map_kwargs)
            if len(list(bad.take(1)) if isinstance(bad, IterableDataset) else bad) > 0:
                raise ValueError(
                    f"Column {REF_COLUMN!r}: needs one float per token of `input_ids` (0 on the prompt) under the "
                    "trainer's tokenization; some rows have a different length."
                )
        if args.max_length is not None:
            if args.truncation_mode not in ("keep_start", "keep_end"):
                raise ValueError(f"Unsupported truncation_mode {args.truncation_mode!r}.")
            n = args.max_length
            sl = slice(None, n) if args.truncation_mode == "keep_start" else slice(-n, None)
            columns = [c for c in _PER_TOKEN_COLUMNS if c in (dataset.column_names or _PER_TOKEN_COLUMNS)]
            dataset = dataset.map(lambda ex: {c: ex[c][sl] for c in columns if c in ex}, **map_kwargs)
            has_completion = lambda ex: any(label != -100 for label in ex["labels"])  # noqa: E731
            dataset = drop_truncated_away(dataset, has_completion, f"{dataset_name} dataset", args, **map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _prepare_retain_dataset(self, retain_dataset):
        if retain_dataset is None:
            return None
        if not isinstance(retain_dataset, Dataset):
            raise TypeError("retain_dataset must be a map-style `datasets.Dataset` (rows are drawn by index).")
        names = retain_dataset.column_names
        drop = [c for c in ("completion_weights", "chosen_weights", "rejected_weights") if c in names]
        retain_dataset = retain_dataset.remove_columns(drop)
        no_shuffle = copy.copy(self.args)
        no_shuffle.shuffle_dataset = False
        prepared = SFTTrainer._prepare_dataset(
            self, retain_dataset, self.processing_class, no_shuffle, False, None, "retain"
        )
        prepared = prepared.select_columns(["input_ids", "labels"])
        batch_size = self.args.retain_batch_size or self.args.per_device_train_batch_size
        if len(prepared) < batch_size:
            raise ValueError(f"retain_dataset has {len(prepared)} rows, fewer than one retain batch ({batch_size}).")
        return prepared

    def _retain_batch(self) -> dict:
        """The retain batch for the current forget micro-batch; a pure function of (global step, micro-step)."""
        step, micro = self._retain_position
        micro = micro + 1 if step == self.state.global_step else 0
        self._retain_position = (self.state.global_step, micro)
        draw = self.state.global_step * self.args.gradient_accumulation_steps + micro
        draw = draw * self.accelerator.num_processes + self.accelerator.process_index
        batch_size = self.args.retain_batch_size or self.args.per_device_train_batch_size
        per_cycle = len(self.retain_dataset) // batch_size
        cycle, position = divmod(draw, per_cycle)
        if self._retain_perm is None or self._retain_perm[0] != cycle:
            generator = torch.Generator().manual_seed(self.args.seed + cycle)
            self._retain_perm = (cycle, torch.randperm(len(self.retain_dataset), generator=generator))
        indices = self._retain_perm[1][position * batch_size : (position + 1) * batch_size].tolist()
        return self._prepare_inputs(self.data_collator([self.retain_dataset[i] for i in indices]))

    # ----------------------------------------------------------------------------------------------------------
    # Loss

    def _retain_loss(self, model) -> torch.Tensor:
        inputs = self._retain_batch()
        labels = inputs["labels"]
        mask = (labels[:, 1:] != -100).float()
        count = global_token_count(self, mask)  # several processes: every process's retain tokens
        if self.args.retain_loss_type == "nll":
            out = model(**self._model_inputs(inputs), labels=labels, fused_lm_head=True, use_cache=False)
            return retain_nll(out.log_probs[:, -mask.size(1) :], mask.to(out.log_probs), count)
        logits = model(**self._model_inputs(inputs), use_cache=False).logits[:, -labels.size(1) : -1]
        ref_logits = self._reference_logits(inputs)[:, -labels.size(1) : -1]
        return retain_kl(logits, ref_logits, mask.to(logits.device), count)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        token_weights = inputs.pop("token_weights", None)
        ref_column = inputs.pop(REF_COLUMN, None)
        labels = inputs["labels"]
        outputs = model(**self._model_inputs(inputs), labels=labels, fused_lm_head=True, use_cache=False)
        self._log_sft_metrics(outputs, inputs, mode)
        logps = outputs.log_probs[:, -(labels.size(1) - 1) :]
        completion = (labels[:, 1:] != -100).to(logps.dtype)
        weights = completion if token_weights is None else token_weights[:, 1:].to(logps) * completion

        metrics: dict[str, torch.Tensor] = {}
        if args.npo_loss_type == "simnpo":
            per_example = simnpo_loss(logps, weights, args.beta, args.simnpo_gamma)
            forget_loss = per_example.mean()
            metrics["forget/avg_logp"] = ((logps * weights).sum(-1) / weights.sum(-1).clamp(min=1e-8)).mean()
        else:
            live = ref_column is None
            ref = self._reference_log_probs(inputs).to(logps) if live else ref_column[:, 1:].to(logps) * completion
            per_example, logratio = npo_sequence_loss(logps, ref, weights, args.beta)
            if args.npo_level == "token":  # divided by every process's weighted tokens
                forget_loss = npo_token_loss(logps, ref, weights, args.beta, global_token_count(self, weights))
            else:
                forget_loss = per_example.mean()
            metrics["forget/logratio"] = logratio.detach().mean()
        loss = forget_loss
        if self.aux_loss_enabled:  # SFT's MoE load-balancing loss (its forward only: the forget batch's routing)
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        if mode == "train" and self.retain_dataset is not None and args.retain_weight > 0:
            retain = self._retain_loss(model)
            loss = loss + args.retain_weight * retain
            metrics["retain/loss"] = retain.detach()

        with torch.no_grad():
            num_completion = completion.sum().clamp(min=1)
            metrics["forget/loss"] = forget_loss.detach()
            metrics["forget/nll"] = -(logps.detach() * completion).sum() / num_completion
            metrics["forget/weighted_token_fraction"] = (weights != 0).sum() / num_completion
            for key, value in metrics.items():
                _compat.log_metric(self, mode, key, self.accelerator.gather_for_metrics(value.float()).mean().item())
        if return_outputs:  # as SFT: compute_metrics needs the logits, which the fused head does not build
            warnings.warn(
                "`return_outputs=True`, and the logits it passes to `compute_metrics` and "
                "`preprocess_logits_for_metrics`, are deprecated in trl.SFTTrainer (whose NPOTrainer follows): the "
                "fused LM head does not build the logits, so they are recomputed with an extra forward pass.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**self._model_inputs(inputs), use_cache=False)
        return (loss, outputs) if return_outputs else loss

    def _log_sft_metrics(self, outputs, inputs: dict, mode: str) -> None:
        """What ``trl.SFTTrainer.compute_loss`` logs beside its loss, from the same fused-head outputs: ``entropy``
        and ``mean_token_accuracy`` over the labelled tokens, ``num_tokens`` seen in training, and the MoE
        ``aux_loss``. Kept so SFT's metric names (``metric_for_best_model``, dashboards) work unchanged."""
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        for key, per_token in (("entropy", outputs.entropy), ("mean_token_accuracy", outputs.is_top1)):
            if per_token is not None:  # computed by the fused head SFT adds to the policy
                total = gather(per_token.detach().float().sum()).sum()
                self._metrics[mode][key].append((total / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(gather(outputs.aux_loss.detach()).mean().item())
