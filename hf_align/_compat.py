"""Every private name of TRL, PEFT, transformers, accelerate (and DeepSpeed) that hf-align relies on, in one place.

Why: those names carry no compatibility promise, and a minor release may rename one. Each is listed in
:data:`SEAMS` with the parameters we call or override it with; ``tests/test_compat.py`` checks that each still
exists with that signature in the installed versions, so an upgrade that removes one fails there, loudly, and not
in a user's run. ``pyproject.toml`` pins TRL and PEFT to the minor release CI proves.

* A *use* (a call, or reading/writing a private attribute) goes through one of the small functions below.
* An *override* of a private hook has to stay on the subclass that needs it (Python dispatches on the class); the
  subclass keeps the method and this table lists it. ``tests/test_compat.py`` also fails when one of our classes
  overrides a private library method that is not listed here.

torch's own underscore names (``Tensor._version``, ``Module._parameters``) are left out: torch documents them as
stable. Imports are lazy: importing this module imports no library.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Seam:
    """One private name: ``owner`` (``"module:Qualname"`` or ``"module"``) and its attribute ``name``."""

    owner: str
    name: str
    kind: str
    """``override`` / ``call`` (a method; ``params`` must still be its parameters, in order), ``base`` (a class we
    subclass), ``attribute`` (on the owner object), ``instance`` (an attribute the owner's source sets or reads
    on instances: its source must still spell ``.name``)."""
    params: tuple[str, ...] = ()
    where: str = ""


_DPO = "trl.trainer.dpo_trainer:DPOTrainer"
_SFT = "trl.trainer.sft_trainer:SFTTrainer"
_TRAINER = "transformers.trainer:Trainer"
_TUNER = "peft.tuners.tuners_utils:BaseTuner"
_SAVE = ("self", "output_dir", "state_dict")
_DPO_DATA = ("self", "dataset", "processing_class", "args", "dataset_name")
_SFT_DATA = ("self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name")

SEAMS: tuple[Seam, ...] = (
    # ---- TRL ----------------------------------------------------------------------------------------------------
    Seam("trl.trainer.base_trainer", "_BaseTrainer", "base", where="FeedbackConditionedTrainer"),
    Seam("trl.trainer.base_config", "_BaseConfig", "base", where="FeedbackConditioned/AdaptiveMerge configs"),
    Seam("trl.trainer.base_trainer:_BaseTrainer", "_tag_names", "attribute", where="every trainer's card tags"),
    Seam(
        "transformers.training_args:TrainingArguments",
        "_VALID_DICT_FIELDS",
        "attribute",
        where="FeedbackConditionedConfig.generation_kwargs (a JSON string on the command line, as GRPO's)",
    ),
    Seam("trl.trainer.base_trainer:_BaseTrainer", "_name", "attribute", where="every trainer's card, run name"),
    Seam("trl.trainer.base_trainer:_BaseTrainer", "_paper", "attribute", where="every trainer's card citation"),
    Seam(_DPO, "_prepare_dataset", "override", _DPO_DATA, "MaskedDPOTrainer: token-weight columns"),
    Seam(_DPO, "_precompute_ref_logps", "override", ("self", "dataset", "name", "batch_size"), "MaskedDPOTrainer"),
    Seam(_DPO, "precompute_ref_logps", "instance", where="reference_logps_as_precomputed"),
    Seam(_DPO, "_tokenizer", "instance", where="training_tokenizer"),
    Seam(_DPO, "_metrics", "instance", where="log_metric"),
    Seam(_SFT, "_prepare_dataset", "override", _SFT_DATA, "NPOTrainer: weights, reference column, retain set"),
    Seam(_SFT, "_tokenizer", "instance", where="training_tokenizer"),
    Seam(_SFT, "_metrics", "instance", where="log_metric"),
    Seam("trl.trainer.dpo_trainer", "prepare_deepspeed", "attribute", where="reference_preparation_skipped"),
    Seam("trl.trainer.dpo_trainer", "prepare_fsdp", "attribute", where="reference_preparation_skipped"),
    # ---- transformers -------------------------------------------------------------------------------------------
    Seam(_TRAINER, "_save", "override", _SAVE, "HFAlignTrainerMixin, NeuronMaskTrainerMixin, AdaptiveMerge"),
    Seam(_TRAINER, "_save_checkpoint", "override", ("self", "model", "trial"), "NeuronMask mixin, FeedbackCond."),
    Seam(_TRAINER, "_load_from_checkpoint", "override", ("self", "resume_from_checkpoint", "model"), "mask, merge"),
    Seam(_TRAINER, "_load_best_model", "override", ("self",), "NeuronMaskTrainerMixin"),
    Seam(_TRAINER, "_set_signature_columns_if_needed", "override", ("self",), "MaskedDPO, NPO"),
    Seam(_TRAINER, "_signature_columns", "instance", where="add_signature_columns"),
    Seam(_TRAINER, "_prepare_inputs", "override", ("self", "inputs"), "FeedbackConditioned, NPO's retain batch"),
    Seam(_TRAINER, "_get_output_dir", "call", ("self", "trial"), "checkpoint_folder"),
    Seam(
        "transformers.configuration_utils:PreTrainedConfig",
        "_attn_implementation",
        "attribute",
        where="attn_implementation",
    ),  # fmt: skip
    # ---- PEFT ---------------------------------------------------------------------------------------------------
    Seam(_TUNER, "_prepare_adapter_config", "override", ("self", "peft_config", "model_config"), "AlignerModel"),
    Seam(_TUNER, "_check_target_module_exists", "override", ("peft_config", "key"), "AlignerModel"),
    Seam(
        _TUNER,
        "_create_and_replace",
        "override",
        ("self", "peft_config", "adapter_name", "target", "target_name", "parent", "current_key"),
        "AlignerModel",
    ),  # fmt: skip
    Seam(_TUNER, "_replace_module", "override", ("self", "parent", "child_name", "new_module", "child"), "Aligner"),
    Seam(_TUNER, "_check_merge_allowed", "override", ("self",), "AlignerModel"),
    Seam("peft.tuners.tuners_utils:BaseTunerLayer", "_disable_adapters", "attribute", where="AlignerAttention"),
    Seam("peft.tuners.tuners_utils:BaseTunerLayer", "_active_adapter", "attribute", where="AlignerAttention"),
    Seam("peft.utils.peft_types:PeftType", "_member_map_", "attribute", where="add_enum_member"),
    Seam("peft.utils.peft_types:PeftType", "_value2member_map_", "attribute", where="add_enum_member"),
    Seam("peft.utils.peft_types:PeftType", "_member_names_", "attribute", where="add_enum_member"),
    # ---- accelerate / DeepSpeed / torch DDP ---------------------------------------------------------------------
    Seam("accelerate.state:PartialState", "_shared_state", "attribute", where="pretend_distributed_type (tests)"),
    Seam("deepspeed.utils.z3_leaf_module", "_z3_leaf", "instance", where="mark_zero3_leaf"),
    Seam(
        "torch.nn.parallel.distributed:DistributedDataParallel",
        "_ddp_params_and_buffers_to_ignore",
        "instance",
        where="ddp_ignore",
    ),  # fmt: skip
)
"""Checked by ``tests/test_compat.py``; ``where`` says which hf-align code relies on each name."""


# ---- uses ------------------------------------------------------------------------------------------------------


def add_signature_columns(trainer, names) -> None:
    """Keep our extra dataset columns (e.g. ``token_weights``) through transformers' unused-column removal."""
    columns = trainer._signature_columns
    if columns is not None:  # None: transformers keeps every column anyway
        columns += [name for name in names if name not in columns]


def log_metric(trainer, mode: str, key: str, value: float) -> None:
    """Add ``value`` to TRL's per-mode metric lists, which its ``log`` averages and reports."""
    trainer._metrics[mode][key].append(value)


def training_tokenizer(trainer):
    """The text tokenizer TRL's trainer uses (``processing_class`` itself, or a processor's ``tokenizer``)."""
    return trainer._tokenizer


@contextlib.contextmanager
def reference_logps_as_precomputed(trainer) -> Iterator[None]:
    """Make ``trl.DPOTrainer.compute_loss`` read the reference sums from the batch, as if precomputed."""
    saved = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        yield
    finally:
        trainer.precompute_ref_logps = saved


def checkpoint_folder(trainer, trial) -> str:
    """The folder ``Trainer._save_checkpoint`` writes this step's checkpoint into."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def attn_implementation(config) -> str | None:
    """The attention implementation a model was built with (a reference copy must use the same)."""
    return config._attn_implementation


@contextlib.contextmanager
def reference_preparation_skipped(skip: Callable[[object], bool], *modules) -> Iterator[None]:
    """Within the block, ``prepare_deepspeed`` / ``prepare_fsdp`` as looked up in each of ``modules`` (e.g.
    ``trl.trainer.dpo_trainer``) return a model for which ``skip(model)`` is true unchanged."""
    names = ("prepare_deepspeed", "prepare_fsdp")
    saved = [(module, name, getattr(module, name)) for module in modules for name in names if hasattr(module, name)]

    def passthrough(original):
        def prepare(model, *args, **kwargs):
            return model if skip(model) else original(model, *args, **kwargs)

        return prepare

    for module, name, original in saved:
        setattr(module, name, passthrough(original))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def add_enum_member(enum_class, name: str):
    """Add the string member ``name`` to a closed ``str`` enum (PEFT's ``PeftType``); Python's enums have no
    public way to do it. Returns the existing member when there is one."""
    if name in enum_class.__members__:
        return enum_class[name]
    member = str.__new__(enum_class, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_class
    member._sort_order_ = len(enum_class._member_names_)
    type.__setattr__(enum_class, name, member)  # before the member map knows it: EnumType forbids reassigning members
    enum_class._member_names_.append(name)
    enum_class._member_map_[name] = member
    enum_class._value2member_map_[name] = member
    return member


def mark_zero3_leaf(module) -> None:
    """Make DeepSpeed ZeRO-3 gather ``module``'s whole subtree around its forward (what
    ``deepspeed.utils.set_z3_leaf_module`` sets, without importing DeepSpeed)."""
    module._z3_leaf = True


def ddp_ignore(model, names: list[str]) -> None:
    """Parameters/buffers torch's DDP must neither broadcast nor reduce (TRL's scripts' ``ignore_bias_buffers``)."""
    model._ddp_params_and_buffers_to_ignore = list(names)


def pretend_distributed_type(distributed_type) -> None:
    """Tests only: make accelerate report ``distributed_type`` (e.g. FSDP on CPU processes, which accelerate
    enables only for GPU-like types)."""
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = distributed_type
