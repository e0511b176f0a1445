"""``AdaptiveMergeTrainer`` + ``AdaptiveMergeConfig``: learn AMA's per-block averaging ratios on data.

The α formula, the :class:`~hf_align.merging.adaptive.InterpolatedLinear` wrapper, the penalty weights and the α
file format live in :mod:`hf_align.merging.adaptive` (core); this module is the ``transformers.Trainer`` loop around
them (tokenizing, collating, the penalised loss, α logging, α-only checkpoints) and the final streamed merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from trl.trainer.base_config import _BaseConfig

from hf_align.architectures import layer_index
from hf_align.config_checks import AT_LEAST_ONE, NON_NEGATIVE, Range, option
from hf_align.errors import UserError
from hf_align.io import PathLike, write_json
from hf_align.merging.adaptive import (
    LearnedAlphas,
    adaptive_plan,
    block_assignment,
    reg_weight,
    wrap_for_adaptive_merge,
)
from hf_align.merging.plan import TIED_BLOCKS, check_alpha
from hf_align.trainers._base import HFAlignTrainerMixin, PlotArguments


__all__ = ["AdaptiveMergeConfig", "AdaptiveMergeTrainer", "tokenize_dataset"]


OPEN_UNIT = Range(0, 1, open_low=True, open_high=True)


@dataclass
class AdaptiveMergeConfig(PlotArguments, _BaseConfig):
    """TRL's base training config plus the adaptive AMA knobs; the AMA defaults are the paper's recipe."""

    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pre-alignment model θ0 (α weighs it). The aligned model is the trained one."}
    )
    mask_level: str = field(
        default="block3", metadata={"help": "'blockK': K blocks of ⌊L/K⌋ layers (last takes the rest); 'layerwise'."}
    )
    init_val: float = option(0.2, help="Initial (and mean) block α, in (0, 1).", range=OPEN_UNIT)
    epsilon: float = option(0.2, help="ε in α_b ∝ σ(s_b)+ε: larger ε, smaller spread.", range=NON_NEGATIVE)
    reg_alpha: float = field(default=1e-4, metadata={"help": "Weight of the L1 penalty Σ_linear c·|α − init_val|."})
    reg_type: str = option(
        "weighted", help="'l1' (c=1) or 'weighted' (c = center_weight/(|layer−center|+1)).", choices=("l1", "weighted")
    )
    reg_center: float | None = field(
        default=None,
        metadata={"help": "Layer where the weighted penalty peaks (default L/2: the code's 13 for L=26)."},
    )
    reg_center_weight: float = field(default=25.0, metadata={"help": "Peak value of the weighted penalty."})
    non_linear_alpha: float = field(
        default=1.0, metadata={"help": "Fixed α for embeddings/norms (not learned); 1 = base, as in the reference."}
    )
    tied_block: str = option(
        "head",
        help="With tied embeddings (one tensor for embedding and lm_head): the block whose α it takes, merged once. "
        "'head': learned as lm_head's α (the lookup is interpolated too); 'embed': non_linear_alpha.",
        choices=TIED_BLOCKS,
    )
    merge_head_alpha: float | None = field(
        default=None, metadata={"help": "α for lm_head in the final merge; default the learned one (code: init_val)."}
    )
    max_length: int = option(512, help="Truncate tokenized examples to this many tokens.", range=AT_LEAST_ONE)
    dataset_text_field: str = field(
        default="text", metadata={"help": "Text column; prompt/completion or messages columns are used if present."}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of the raw α parameters."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the data (the paper: 1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep columns; we tokenize ourselves."})
    bf16: bool | None = field(
        default=False,
        metadata={
            "help": "bf16 mixed precision while learning the α's (TRL's default would be on). Off by default: the "
            "prepared model keeps its autocast after training, so its outputs would no longer match the fp32 merge."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_alpha(self.non_linear_alpha, "non_linear_alpha")
        if self.merge_head_alpha is not None:
            check_alpha(self.merge_head_alpha, "merge_head_alpha")
        block_assignment(10**6, self.mask_level)  # validates the syntax


def tokenize_dataset(dataset, tokenizer, max_length: int, text_field: str = "text"):
    """``text`` → LM loss on all tokens; ``prompt``/``completion`` (plain or chat) → loss on the completion."""
    columns = dataset.column_names

    def encode(example):
        if "prompt" in columns and "completion" in columns:
            prompt, completion = example["prompt"], example["completion"]
            if isinstance(prompt, list):
                prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            else:
                prompt_text, full = prompt, prompt + completion + (tokenizer.eos_token or "")
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
            labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
        elif "messages" in columns:
            ids = tokenizer.apply_chat_template(example["messages"], tokenize=True)[:max_length]
            labels = list(ids)
        elif text_field in columns:
            ids = tokenizer(example[text_field], add_special_tokens=False)["input_ids"][:max_length]
            labels = list(ids)
        else:
            raise UserError(
                f"dataset: need a {text_field!r} column, prompt/completion or messages columns; found {columns}."
            )
        return {"input_ids": ids, "labels": labels}

    return dataset.map(encode, remove_columns=columns)


def _refuse_sharded_parameters(args) -> None:
    """ZeRO-3 / FSDP shard parameters; θ0's and θ1's weights are buffers here (only the α's are parameters)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    fsdp = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp or is_deepspeed_zero3_enabled():
        setup = "FSDP" if fsdp else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"AdaptiveMergeTrainer cannot run under {setup}: it holds θ0's and θ1's weights as buffers of the wrapped "
            f"layers (only the α's train), which {setup} neither shards nor gathers. Learn the α's under DDP or "
            "DeepSpeed ZeRO-2 (or on one process); the final merge streams from disk either way."
        )


class _PadCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _AlphasOnlySave:
    """The save step of :class:`AdaptiveMergeTrainer`, one class below :class:`HFAlignTrainerMixin` in the MRO."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Only the α's (safetensors + JSON) and the tokenizer: the model weights are θ0/θ1, unchanged.

        No ``super()._save``: ``Trainer._save`` would write the whole (wrapped) model and a pickled
        ``training_args.bin``; :class:`HFAlignTrainerMixin`, above this class in the MRO, adds ``training_args.json``.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.learned_alphas().save(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        write_json(Path(output_dir) / "adaptive_merge_config.json", self.args.to_dict())


class AdaptiveMergeTrainer(HFAlignTrainerMixin, _AlphasOnlySave, Trainer):
    """Learns AMA's per-block α's on data through the ordinary ``Trainer`` loop (logging, checkpoints, accelerate).

    ``model``: the aligned model θ1 (instance or path); ``base_model``: θ0 (instance or path, default
    ``args.base_model_name_or_path``). Both are frozen; ``model`` is wrapped in place. Checkpoints and
    ``save_model`` write only ``ama_alphas.safetensors`` + ``ama_alphas.json``; :meth:`merge` writes the
    averaged model with the learned α's through the streaming merge.
    """

    _name = "AdaptiveMerge"
    card_library_name = "hf-align"  # the folder holds α's, not a transformers model

    def card_how_to_load(self, repo: str) -> str:
        """The folder holds the learned α's, not a model: merge with them (the model card's snippet)."""
        return (
            "from hf_align.merging.adaptive import LearnedAlphas\n\n"
            f'alphas = LearnedAlphas.load("{repo}")  # then: hf-align adaptive-merge ... or AdaptiveMergeTrainer.merge'
        )

    def __init__(self, model, base_model=None, args: AdaptiveMergeConfig | None = None, train_dataset=None,
                 processing_class=None, data_collator=None, **kwargs):  # fmt: skip
        from hf_align.loading import check_gguf_inputs, load_model, load_tokenizer

        args = args or AdaptiveMergeConfig(output_dir="adaptive_merge")
        _refuse_sharded_parameters(args)
        paths = [m for m in (model, base_model or args.base_model_name_or_path) if isinstance(m, str | os.PathLike)]
        check_gguf_inputs(*paths)  # both .gguf headers before either model is loaded
        self.aligned_path = model if isinstance(model, str | os.PathLike) else getattr(model, "name_or_path", None)
        if isinstance(model, str | os.PathLike):
            model = load_model(model)
        base_model = base_model if base_model is not None else args.base_model_name_or_path
        if base_model is None:
            raise ValueError("AdaptiveMergeTrainer needs base_model (or args.base_model_name_or_path): θ0.")
        self.base_path = (
            base_model if isinstance(base_model, str | os.PathLike) else getattr(base_model, "name_or_path", None)
        )
        if isinstance(base_model, str | os.PathLike):
            base_model = load_model(base_model, dtype=model.dtype)
        if processing_class is None:
            processing_class = load_tokenizer(self.aligned_path or self.base_path)
        self.alphas, self.wrapped_modules, self.num_layers, self.tied_embedding = wrap_for_adaptive_merge(
            model, base_model, args.mask_level, args.init_val, args.epsilon, args.non_linear_alpha, args.tied_block
        )
        self.base_model = base_model  # keeps θ0's Linear weights alive (the wrappers reference them)
        center = args.reg_center if args.reg_center is not None else self.num_layers / 2
        self._reg_weights = {
            name: reg_weight(self.num_layers if block is None else layer_index(f"{name}."), args.reg_type, center,
                             args.reg_center_weight)
            for name, block in self.wrapped_modules.items()
        }  # fmt: skip
        if train_dataset is not None and "input_ids" not in train_dataset.column_names:
            train_dataset = tokenize_dataset(train_dataset, processing_class, args.max_length, args.dataset_text_field)
        if data_collator is None:
            pad = processing_class.pad_token_id if processing_class.pad_token_id is not None else 0
            data_collator = _PadCollator(pad)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=data_collator, **kwargs)  # fmt: skip
        self._set_trainable_fraction()

    def regularizer(self) -> torch.Tensor:
        """Σ over wrapped Linear modules of c(layer)·|α_module − init_val|."""
        blocks, head = self.alphas()
        init = self.args.init_val
        terms = [
            self._reg_weights[name] * torch.abs((head if block is None else blocks[block]) - init)
            for name, block in self.wrapped_modules.items()
        ]
        return torch.stack(terms).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = loss + self.args.reg_alpha * self.regularizer().to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        with torch.no_grad():
            blocks, head = self.alphas()
        logs.update({f"alpha/block_{i}": round(float(a), 6) for i, a in enumerate(blocks)})
        logs["alpha/lm_head"] = round(float(head), 6)
        super().log(logs, start_time)

    def learned_alphas(self) -> LearnedAlphas:
        return LearnedAlphas(
            init_val=self.args.init_val,
            epsilon=self.args.epsilon,
            mask_level=self.args.mask_level,
            num_layers=self.num_layers,
            block_params=self.alphas.blocks.detach().float().cpu().tolist(),
            head_param=float(self.alphas.head.detach()),
            modules=dict(self.wrapped_modules),
            non_linear_alpha=self.args.non_linear_alpha,
            tied_embedding=self.tied_embedding,
            tied_block=self.args.tied_block if self.tied_embedding else None,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        learned = LearnedAlphas.load(resume_from_checkpoint)
        with torch.no_grad():
            self.alphas.blocks.copy_(torch.tensor(learned.block_params))
            self.alphas.head.fill_(learned.head_param)

    def merge(self, output_dir: PathLike, base: PathLike | None = None, aligned: PathLike | None = None, **kwargs):
        """Stream-merge θ0 and θ1 from disk with the learned α's (``kwargs`` go to :func:`merge_models`; its
        ``plot`` follows ``args.plots`` when matplotlib is installed)."""
        from hf_align.merging.streaming import merge_models
        from hf_align.plots import matplotlib_available

        base, aligned = base or self.base_path, aligned or self.aligned_path
        if base is None or aligned is None:
            raise ValueError("merge() needs the base and aligned checkpoints on disk: pass base= and aligned=.")
        learned = self.learned_alphas()
        kwargs.setdefault("plot", self.args.plots and matplotlib_available())
        return merge_models(
            base, aligned, output_dir,
            plan=lambda names, config: adaptive_plan(learned, names, self.args.merge_head_alpha), **kwargs,
        )  # fmt: skip
