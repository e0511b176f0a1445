"""Adaptive model averaging (AMA proper, arXiv 2309.06256, ``mask_norm_sigmoid_linear``).

Every ``nn.Linear`` of the aligned model is replaced by an :class:`InterpolatedLinear` that computes
``W = α·W0 + (1−α)·W1`` on the fly from *references* to the base (θ0) and aligned (θ1) weights (bias likewise),
so no third copy of the model exists. ``mask_level="blockK"`` splits the L decoder layers into K blocks of ⌊L/K⌋
layers (the last takes the rest); block b has one raw parameter ``s_b`` (initialised to logit(init_val)) and
``lm_head`` its own ``s_h``. Effective ratios, as in the reference code::

    α_b = init_val · (σ(s_b) + ε) / Σ_j (σ(s_j) + ε) · K       (j over the K block parameters)
    α_h = init_val · (σ(s_h) + ε) / Σ_j (σ(s_j) + ε) · K       (lm_head: same denominator, not part of the sum)

Loss = causal-LM loss + ``reg_alpha · Σ_linear c(layer) · |α − init_val|`` (one term per wrapped Linear), with
``c = 1`` (``reg_type="l1"``) or ``c = reg_center_weight / (|layer − reg_center| + 1)`` (``"weighted"``; the code's
25/(|layer−13|+1) for a 26-layer model; lm_head counts as layer L). Only the s parameters train.

Not-Linear tensors (embeddings, norms) are not learned: like the reference (training and merge script) they
come from the base model (``non_linear_alpha=1``); set another fixed α if you prefer. With tied embeddings the
head is the embedding and follows ``non_linear_alpha``. The reference *merge* script ignores the learned head
α and uses init_val; we use the learned one (what was optimised) unless ``merge_head_alpha`` is given.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_align.callbacks.json_training_args import JsonTrainingArgsCallback
from hf_align.io import PathLike, load_tensors, read_json, save_tensors, write_json
from hf_align.merging.plan import MergePlan, check_alpha, layer_index


ALPHAS_TENSORS = "ama_alphas.safetensors"
ALPHAS_JSON = "ama_alphas.json"


def block_assignment(num_layers: int, mask_level: str) -> list[int]:
    """Block index of every layer: ``blockK`` → K blocks of ⌊L/K⌋ layers, the last takes the rest;
    ``layerwise`` → one block per layer."""
    if mask_level == "layerwise":
        return list(range(num_layers))
    if not (mask_level.startswith("block") and mask_level[5:].isdigit() and int(mask_level[5:]) > 0):
        raise ValueError(f"mask_level must be 'blockK' (e.g. 'block3') or 'layerwise', got {mask_level!r}.")
    blocks = int(mask_level[5:])
    per_block = num_layers // blocks
    if per_block == 0:
        raise ValueError(f"mask_level {mask_level!r}: {blocks} blocks but the model has only {num_layers} layers.")
    return [min(layer // per_block, blocks - 1) for layer in range(num_layers)]


def normalized_alphas(
    block_params: torch.Tensor, head_param: torch.Tensor, init_val: float, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α per block, α of lm_head) from the raw parameters (formula in the module docstring)."""
    weights = torch.sigmoid(block_params) + epsilon
    scale = init_val * block_params.numel() / weights.sum()
    return weights * scale, (torch.sigmoid(head_param) + epsilon) * scale


def reg_weight(layer: float, reg_type: str, center: float, center_weight: float) -> float:
    """c(layer): 1 for ``l1``; ``center_weight / (|layer − center| + 1)`` for ``weighted``."""
    if reg_type == "l1":
        return 1.0
    if reg_type == "weighted":
        return center_weight / (abs(layer - center) + 1.0)
    raise ValueError(f"reg_type must be 'l1' or 'weighted', got {reg_type!r}.")


class AlphaParameters(nn.Module):
    """The only trainable tensors: one raw ``s`` per block and one for ``lm_head``."""

    def __init__(self, num_blocks: int, init_val: float, epsilon: float):
        super().__init__()
        start = math.log(init_val / (1 - init_val))
        self.blocks = nn.Parameter(torch.full((num_blocks,), start, dtype=torch.float32))
        self.head = nn.Parameter(torch.tensor(start, dtype=torch.float32))
        self.init_val, self.epsilon = init_val, epsilon

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return normalized_alphas(self.blocks, self.head, self.init_val, self.epsilon)


class InterpolatedLinear(nn.Module):
    """``F.linear(x, α·W0 + (1−α)·W1, α·b0 + (1−α)·b1)`` with W0, W1 held by reference (frozen buffers)."""

    def __init__(self, base: nn.Linear, aligned: nn.Linear, alphas: AlphaParameters, block: int | None):
        super().__init__()
        self.register_buffer("base_weight", base.weight.detach(), persistent=False)
        self.register_buffer("aligned_weight", aligned.weight.detach(), persistent=False)
        has_bias = aligned.bias is not None
        self.register_buffer("base_bias", base.bias.detach() if has_bias else None, persistent=False)
        self.register_buffer("aligned_bias", aligned.bias.detach() if has_bias else None, persistent=False)
        self.in_features, self.out_features = aligned.in_features, aligned.out_features
        self.block = block  # None: lm_head
        object.__setattr__(self, "_alphas", alphas)  # shared; registered once on the model, not per module

    def alpha(self) -> torch.Tensor:
        blocks, head = self._alphas()
        return head if self.block is None else blocks[self.block]

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects .weight (dtype/device checks, generation)
        return self.aligned_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha().to(self.aligned_weight.dtype)
        weight = self.aligned_weight + alpha * (self.base_weight - self.aligned_weight)
        bias = None
        if self.aligned_bias is not None:
            bias = self.aligned_bias + alpha * (self.base_bias - self.aligned_bias)
        return F.linear(x, weight, bias)


def wrap_for_adaptive_merge(
    model: nn.Module, base_model: nn.Module, mask_level: str, init_val: float, epsilon: float, non_linear_alpha: float
) -> tuple[AlphaParameters, dict[str, int | None], int]:
    """Freeze both models, replace every Linear of ``model`` by an :class:`InterpolatedLinear`, set the other
    parameters to ``non_linear_alpha``·θ0 + (1−α)·θ1 in place; returns (alphas, module → block, num_layers)."""
    base_modules = dict(base_model.named_modules())
    base_params = dict(base_model.named_parameters())
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    indices = [layer_index(f"{n}.") for n in linear_names]
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    num_layers = num_layers or max(i for i in indices if i is not None) + 1
    blocks = block_assignment(num_layers, mask_level)
    alphas = AlphaParameters(max(blocks) + 1, init_val, epsilon)
    for param in [*model.parameters(), *base_model.parameters()]:
        param.requires_grad_(False)
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is (
        model.get_input_embeddings().weight
    )
    output_embeddings = model.get_output_embeddings()
    modules: dict[str, int | None] = {}
    for name, index in zip(linear_names, indices):
        module = model.get_submodule(name)
        if tied and module is output_embeddings:
            continue
        if name not in base_modules or base_modules[name].weight.shape != module.weight.shape:
            raise ValueError(f"base model has no Linear {name!r} with shape {tuple(module.weight.shape)}.")
        if index is None and module is not output_embeddings:
            raise ValueError(f"Linear {name!r} is neither in a decoder layer nor the lm_head; cannot assign a block.")
        block = None if index is None else blocks[index]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, InterpolatedLinear(base_modules[name], module, alphas, block))
        modules[name] = block
    for name, param in model.named_parameters():
        if name not in base_params:
            raise ValueError(f"base model has no parameter {name!r}.")
        if non_linear_alpha != 0.0:
            param.data.lerp_(base_params[name].data.to(param.dtype), non_linear_alpha)
    model.add_module("ama_alphas", alphas)
    return alphas, modules, num_layers


@dataclass
class LearnedAlphas:
    """What adaptive AMA learned; enough to rebuild the per-tensor plan for the streaming merge."""

    init_val: float
    epsilon: float
    mask_level: str
    num_layers: int
    block_params: list[float]
    head_param: float
    modules: dict[str, int | None]  # wrapped Linear module → block (None: lm_head)
    non_linear_alpha: float = 1.0
    block_alphas: list[float] = field(default_factory=list)
    head_alpha: float = 0.0

    def __post_init__(self):
        blocks, head = normalized_alphas(
            torch.tensor(self.block_params, dtype=torch.float64),
            torch.tensor(self.head_param, dtype=torch.float64),
            self.init_val,
            self.epsilon,
        )
        self.block_alphas, self.head_alpha = blocks.tolist(), float(head)

    def save(self, directory: PathLike) -> None:
        directory = Path(directory)
        tensors = {"blocks": torch.tensor(self.block_params), "head": torch.tensor([self.head_param])}
        save_tensors(
            directory / ALPHAS_TENSORS, tensors, metadata={"format": "pt", "method": "mask_norm_sigmoid_linear"}
        )
        write_json(directory / ALPHAS_JSON, asdict(self))

    @classmethod
    def load(cls, directory: PathLike) -> LearnedAlphas:
        directory = Path(directory)
        data = read_json(directory / ALPHAS_JSON)
        tensors = load_tensors(directory / ALPHAS_TENSORS)
        data["block_params"], data["head_param"] = tensors["blocks"].tolist(), float(tensors["head"][0])
        data.pop("block_alphas", None), data.pop("head_alpha", None)
        return cls(**data)


def adaptive_plan(learned: LearnedAlphas, names: list[str], merge_head_alpha: float | None = None) -> MergePlan:
    """Per-tensor α for the streaming merge: wrapped Linear weights/biases get their block's (or the head's)
    learned α; every other tensor gets ``learned.non_linear_alpha`` (as during training)."""
    head = learned.head_alpha if merge_head_alpha is None else check_alpha(merge_head_alpha, "merge_head_alpha")
    alphas: dict[str, float] = {}
    groups: dict[str, str] = {}
    for name in names:
        module, _, kind = name.rpartition(".")
        if kind in ("weight", "bias") and module in learned.modules:
            block = learned.modules[module]
            alphas[name] = head if block is None else learned.block_alphas[block]
            groups[name] = "lm_head" if block is None else f"block {block} Linear"
        else:
            alphas[name] = learned.non_linear_alpha
            groups[name] = "not Linear (embeddings, norms)"
    description = (
        f"adaptive {learned.mask_level} init={learned.init_val} ε={learned.epsilon}: blocks "
        f"{[round(a, 4) for a in learned.block_alphas]}, head {round(head, 4)}"
    )
    return MergePlan(alphas=alphas, groups=groups, description=description)


@dataclass
class AdaptiveMergeConfig(TrainingArguments):
    """``TrainingArguments`` plus the adaptive AMA knobs; defaults are the paper's recipe."""

    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pre-alignment model θ0 (α weighs it). The aligned model is the trained one."}
    )
    mask_level: str = field(
        default="block3", metadata={"help": "'blockK': K blocks of ⌊L/K⌋ layers (last takes the rest); 'layerwise'."}
    )
    init_val: float = field(default=0.2, metadata={"help": "Initial (and mean) block α, in (0, 1)."})
    epsilon: float = field(default=0.2, metadata={"help": "ε in α_b ∝ σ(s_b)+ε: larger ε, smaller spread."})
    reg_alpha: float = field(default=1e-4, metadata={"help": "Weight of the L1 penalty Σ_linear c·|α − init_val|."})
    reg_type: str = field(
        default="weighted", metadata={"help": "'l1' (c=1) or 'weighted' (c = center_weight/(|layer−center|+1))."}
    )
    reg_center: float | None = field(
        default=None,
        metadata={"help": "Layer where the weighted penalty peaks (default L/2: the code's 13 for L=26)."},
    )
    reg_center_weight: float = field(default=25.0, metadata={"help": "Peak value of the weighted penalty."})
    non_linear_alpha: float = field(
        default=1.0, metadata={"help": "Fixed α for embeddings/norms (not learned); 1 = base, as in the reference."}
    )
    merge_head_alpha: float | None = field(
        default=None, metadata={"help": "α for lm_head in the final merge; default the learned one (code: init_val)."}
    )
    max_length: int = field(default=512, metadata={"help": "Truncate tokenized examples to this many tokens."})
    dataset_text_field: str = field(
        default="text", metadata={"help": "Text column; prompt/completion or messages columns are used if present."}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of the raw α parameters."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the data (the paper: 1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep columns; we tokenize ourselves."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.init_val < 1.0:
            raise ValueError(f"init_val must be in (0, 1), got {self.init_val}.")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be ≥ 0, got {self.epsilon}.")
        if self.reg_type not in ("l1", "weighted"):
            raise ValueError(f"reg_type must be 'l1' or 'weighted', got {self.reg_type!r}.")
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
            raise ValueError(
                f"dataset: need a {text_field!r} column, prompt/completion or messages columns; found {columns}."
            )
        return {"input_ids": ids, "labels": labels}

    return dataset.map(encode, remove_columns=columns)


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


class AdaptiveMergeTrainer(Trainer):
    """Learns AMA's per-block α's on data through the ordinary ``Trainer`` loop (logging, checkpoints, accelerate).

    ``model``: the aligned model θ1 (instance or path); ``base_model``: θ0 (instance or path, default
    ``args.base_model_name_or_path``). Both are frozen; ``model`` is wrapped in place. Checkpoints and
    ``save_model`` write only ``ama_alphas.safetensors`` + ``ama_alphas.json``; :meth:`merge` writes the
    averaged model with the learned α's through the streaming merge.
    """

    def __init__(self, model, base_model=None, args: AdaptiveMergeConfig | None = None, train_dataset=None,
                 processing_class=None, data_collator=None, **kwargs):  # fmt: skip
        from transformers import AutoModelForCausalLM, AutoTokenizer

        args = args or AdaptiveMergeConfig(output_dir="adaptive_merge")
        self.aligned_path = model if isinstance(model, str | os.PathLike) else getattr(model, "name_or_path", None)
        if isinstance(model, str | os.PathLike):
            model = AutoModelForCausalLM.from_pretrained(model)
        base_model = base_model if base_model is not None else args.base_model_name_or_path
        if base_model is None:
            raise ValueError("AdaptiveMergeTrainer needs base_model (or args.base_model_name_or_path): θ0.")
        self.base_path = (
            base_model if isinstance(base_model, str | os.PathLike) else getattr(base_model, "name_or_path", None)
        )
        if isinstance(base_model, str | os.PathLike):
            base_model = AutoModelForCausalLM.from_pretrained(base_model, dtype=model.dtype)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(self.aligned_path or self.base_path)
        self.alphas, self.wrapped_modules, self.num_layers = wrap_for_adaptive_merge(
            model, base_model, args.mask_level, args.init_val, args.epsilon, args.non_linear_alpha
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
        self.add_callback(JsonTrainingArgsCallback())  # no pickled training_args.bin in checkpoints

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
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Only the α's (safetensors + JSON) and the tokenizer: the model weights are θ0/θ1, unchanged."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.learned_alphas().save(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        write_json(Path(output_dir) / "adaptive_merge_config.json", self.args.to_dict())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        learned = LearnedAlphas.load(resume_from_checkpoint)
        with torch.no_grad():
            self.alphas.blocks.copy_(torch.tensor(learned.block_params))
            self.alphas.head.fill_(learned.head_param)

    def merge(self, output_dir: PathLike, base: PathLike | None = None, aligned: PathLike | None = None, **kwargs):
        """Stream-merge θ0 and θ1 from disk with the learned α's (``kwargs`` go to :func:`merge_models`)."""
        from hf_align.merging.streaming import merge_models

        base, aligned = base or self.base_path, aligned or self.aligned_path
        if base is None or aligned is None:
            raise ValueError("merge() needs the base and aligned checkpoints on disk: pass base= and aligned=.")
        learned = self.learned_alphas()
        return merge_models(
            base, aligned, output_dir,
            plan=lambda names, config: adaptive_plan(learned, names, self.args.merge_head_alpha), **kwargs,
        )  # fmt: skip
