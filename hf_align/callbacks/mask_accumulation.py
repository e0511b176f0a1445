"""``MaskAccumulationCallback``: measure which neurons alignment uses during a (warm-up) run.

ALLO's first stage runs a short DPO warm-up and keeps the parameters that moved most. This callback
records that importance during *any* ``transformers.Trainer`` run (TRL's DPOTrainer/SFTTrainer,
hf-align's trainers) and writes it as neuron scores (``hf_align.scores``), which
``NeuronMask.from_scores`` turns into the mask for the later stages.

Two statistics:

* ``method="gradient"``: Σ over optimizer steps of |g| (or g²) per output row (or per entry), read once
  per optimizer step in ``on_pre_optimizer_step`` — after gradient accumulation and the DDP all-reduce,
  before the optimizer steps and zeroes the gradients. The Trainer clips gradients *before* that hook,
  so for ``grad_stage="pre_clip"`` (default) the callback takes clipping over: it sets
  ``args.max_grad_norm = 0`` for the run, reads the raw gradients, then clips them itself with the
  original norm (same ``clip_grad_norm_`` semantics; the logged ``grad_norm`` is unchanged; the value is
  restored at train end). ``grad_stage="post_clip"`` reads the clipped gradients and touches nothing.
  Needs trainable weights: with a frozen PEFT base the base weights have no gradient — use
  ``method="weight_diff"``, which scores the merged (base + LoRA delta) weights.
* ``method="weight_diff"``: |θ_end − θ_start| as ALLO's ``gen_neuron_mask.py``, computed at each save and
  at train end. θ_start is read tensor by tensor from ``init_path`` (a safetensors checkpoint, or a GGUF
  file converted once), or from a snapshot the callback writes at train begin into
  ``<output_dir>/_neuron_scores_init/`` — never kept in memory, never pushed with the run (``_``).

Sharded training (DeepSpeed ZeRO-1/2/3, FSDP2): parameters and gradients are slices, so every score is computed
from the full tensor, gathered per parameter (a collective every rank joins: the callback calls it on all ranks).
Under DeepSpeed the optimizer step runs inside ``backward`` (accelerate), before ``on_pre_optimizer_step``: the
gradients are read in a wrapper around the ZeRO optimizer's ``step`` instead -- reduced, not yet clipped (DeepSpeed
clips inside that step), so ``grad_stage="pre_clip"`` holds and ``max_grad_norm`` is left alone; ``"post_clip"``
is refused there. Under FSDP2 the DTensor gradients are gathered in ``on_pre_optimizer_step``.

Memory: row scores cost 4 bytes per output row. Element-granularity gradient scores cost one value per
parameter: 4 bytes (``score_dtype="float32"``) or 2 bytes (``"bfloat16"``/``"float16"``), on the
parameter's device or in host memory with ``offload_to_cpu=True``. Element-granularity ``weight_diff``
keeps nothing during training but builds the scores (``score_dtype`` per parameter) in host memory at
each save.

Files: ``neuron_scores.safetensors`` + ``neuron_scores.json`` in every checkpoint and in ``output_dir`` at
the end; with ``select_ratio`` also the selected mask in ``<output_dir>/neuron_mask/``. Resuming from a
checkpoint reloads the running totals, so an interrupted run ends with the same scores as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hf_align.architectures import neuron_axes, neuron_axis
from hf_align.io import atomic_dir, save_tensors, write_json
from hf_align.masks import MaskSelection, parameter_shape
from hf_align.scores import (
    GRAD_STAGES,
    METHODS,
    CheckpointReader,
    ScoreOptions,
    load_scores,
    matches_target,
    plain_name,
    reduce_magnitude,
    save_scores,
    weight_diff_scores,
)


__all__ = ["GRAD_STAGES", "METHODS", "SCORE_DTYPES", "MaskAccumulationCallback", "effective_weights", "write_snapshot"]

SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # ScoreOptions'
# θ_start's snapshot, a copy of the weights kept for resuming: "_" because a Trainer's push_to_hub skips such names
INIT_SNAPSHOT_DIR = "_neuron_scores_init"
_OLD_SNAPSHOT_DIR = "neuron_scores_init"  # its earlier name: a run started with it still resumes
MASK_DIR = "neuron_mask"
_SHARD_BYTES = 1 << 30


def _is_sharded(param: torch.Tensor) -> bool:
    """A ZeRO-3 partition or an FSDP2 DTensor: the full tensor must be gathered."""
    return hasattr(param, "ds_id") or hasattr(param, "full_tensor")


def _full(param: torch.Tensor) -> torch.Tensor:
    """The full value of ``param`` (a collective for sharded parameters: every rank must call it)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    if hasattr(param, "full_tensor"):
        return param.detach().full_tensor()
    return param.detach()


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ZeRO-3 partition or an FSDP2 DTensor."""
    return any(_is_sharded(p) for p in model.parameters())


def effective_weights(model: torch.nn.Module, target: str | Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(plain name, weight)`` for every base-model parameter; PEFT LoRA layers yield base + delta (merged view).

    Sharded parameters (ZeRO-3, FSDP2) are gathered one at a time: every rank must iterate this to the end.
    """
    for name, param in model.named_parameters():
        plain = plain_name(name)
        if plain is None or not matches_target(plain, target):
            continue
        weight = _full(param)
        if ".base_layer." in name and name.endswith(".weight"):
            module = model.get_submodule(name.rsplit(".base_layer.", 1)[0])
            lora_a = getattr(module, "lora_A", {})
            if hasattr(module, "get_delta_weight") and not getattr(module, "merged", False):
                for adapter in getattr(module, "active_adapters", []):
                    if adapter in lora_a:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        yield plain, weight


def write_snapshot(directory: str | os.PathLike, model: torch.nn.Module, target=None, write: bool = True) -> Path:
    """Save the model's (effective) weights as sharded safetensors, one shard (≤1 GiB) in host memory at a time.

    ``write=False``: only join the gathers of a sharded model (the other ranks of a ZeRO-3 / FSDP2 run).
    """
    if not write:
        for _ in effective_weights(model, target):
            pass
        return Path(directory)
    with atomic_dir(directory, overwrite=True) as tmp:
        shard: dict[str, torch.Tensor] = {}
        size, weight_map, index = 0, {}, 0

        def flush():
            nonlocal shard, size, index
            if shard:
                file = f"model-{index:05d}.safetensors"
                save_tensors(tmp / file, shard)
                weight_map.update(dict.fromkeys(shard, file))
                shard, size, index = {}, 0, index + 1

        for name, weight in effective_weights(model, target):
            shard[name] = weight.detach().to("cpu", copy=True)
            size += weight.numel() * weight.element_size()
            if size >= _SHARD_BYTES:
                flush()
        flush()
        write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    return Path(directory)


class MaskAccumulationCallback(TrainerCallback):
    """Accumulate neuron-importance scores during training; write them into every checkpoint and the output dir.

    Args:
        options: how to score (:class:`~hf_align.scores.ScoreOptions`: method, granularity, statistic, grad_stage,
            score_dtype, offload_to_cpu -- defaults and help declared there); the keyword arguments of the same
            names override its fields.
        selection: with a ratio, write ``NeuronMask.from_scores(scores, selection)`` to ``output_dir/neuron_mask``
            (:class:`~hf_align.masks.MaskSelection`); ``select_ratio``, ``select_scope``, ``select``,
            ``exclude_top`` and ``seed`` override its fields.
        target: which plain-model parameters to score: ``None`` (all), a regex, or a list of module names.
        init_path: θ_start for ``weight_diff``: a safetensors file/folder, or a ``.gguf`` file (converted once into
            the run's snapshot folder); default: a snapshot at train begin.
        save_to_checkpoints: also write the scores into every ``checkpoint-N`` folder (needed for resuming).
        resume_from: folder holding the scores to continue from when resuming; default: the checkpoint the
            Trainer resumes from (``args.resume_from_checkpoint`` or ``output_dir/checkpoint-<global_step>``).
    """

    def __init__(
        self,
        method: str | None = None,
        granularity: str | None = None,
        statistic: str | None = None,
        grad_stage: str | None = None,
        score_dtype: str | None = None,
        offload_to_cpu: bool | None = None,
        target: str | list[str] | None = None,
        init_path: str | None = None,
        save_to_checkpoints: bool = True,
        select_ratio: float | None = None,
        select_scope: str | None = None,
        select: str | None = None,
        exclude_top: float | None = None,
        seed: int | None = None,
        resume_from: str | None = None,
        *,
        options: ScoreOptions | None = None,
        selection: MaskSelection | None = None,
    ):
        scoring = dict(
            method=method,
            granularity=granularity,
            statistic=statistic,
            grad_stage=grad_stage,
            score_dtype=score_dtype,
            offload_to_cpu=offload_to_cpu,
        )
        self.options = _with(options or ScoreOptions(), scoring)
        choosing = dict(ratio=select_ratio, scope=select_scope, select=select, exclude_top=exclude_top, seed=seed)
        self.selection = _with(selection or MaskSelection(), choosing)
        for name, value in dataclasses.asdict(self.options).items():  # read-only views of the options
            setattr(self, name, value)
        self.select_ratio = self.selection.ratio
        self.target = target
        self.init_path = init_path
        from hf_align.loading import check_gguf_inputs

        self._init_gguf = check_gguf_inputs(init_path)[0]  # a GGUF's header checked now, before training
        self.save_to_checkpoints = save_to_checkpoints
        self.resume_from = resume_from

        self.totals: dict[str, torch.Tensor] = {}
        self.num_steps = 0
        self.skipped_steps = 0
        self._tracked: list[tuple[str, torch.nn.Parameter]] = []
        self._max_grad_norm: float | None = None
        self._args = None
        self._final_scores: dict[str, torch.Tensor] | None = None
        self._progress = False  # a bar for the weight-diff pass at save: the Trainer's disable_tqdm, main process
        self._neuron_sizes: dict[str, int] | None = None  # set at train begin
        self._wrapped_step: tuple[Any, Any] | None = None  # (DeepSpeed ZeRO optimizer, its own step)
        self._sharded = False

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("MaskAccumulationCallback needs the Trainer to pass `model` to callbacks.")
        self._final_scores = None
        self._progress = not args.disable_tqdm and state.is_world_process_zero
        self._sharded = is_sharded_model(model)
        from hf_align.masks import neuron_sizes

        self._neuron_sizes = neuron_sizes(model)  # row lengths: budget="params" and the mask's weight count
        if self.method == "gradient":
            self._setup_gradient(model, args, _deepspeed_optimizer(optimizer))
        else:
            self._setup_weight_diff(model, args, state)
        self.totals = self._zero_totals() if self.method == "gradient" else {}
        self.num_steps = self.skipped_steps = 0
        if state.global_step > 0:
            self._restore(args, state)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.method != "gradient" or self._wrapped_step is not None:  # DeepSpeed: read inside its step
            return
        if any(hasattr(p.grad, "full_tensor") for p in model.parameters() if p.grad is not None):
            return self._fsdp_step(model)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if math.isfinite(float(total_norm)):
            self._accumulate()
            self.num_steps += 1
        else:  # an fp16 overflow step that the grad scaler will skip: it must not poison the totals
            self.skipped_steps += 1
        if self._max_grad_norm is not None and grads:
            torch.nn.utils.clip_grads_with_norm_(
                [p for p in model.parameters() if p.grad is not None], self._max_grad_norm, total_norm
            )

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save_to_checkpoints:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not checkpoint.is_dir():
            self._join_gathers(model)  # sharded weight_diff: rank 0's gathers need every rank, whatever it writes
            return
        save_scores(checkpoint, self.scores(model), self._meta(state))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._restore_clipping()
        self._unwrap_step()
        if not state.is_world_process_zero:
            self._join_gathers(model)
            return
        scores = self.scores(model)
        self._final_scores = scores
        save_scores(args.output_dir, scores, self._meta(state))
        if self.select_ratio is not None:
            self.select_mask(scores).save(Path(args.output_dir) / MASK_DIR)

    # ------------------------------------------------------------------------------------------ public
    def scores(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Current scores (CPU tensors keyed by plain names); ``weight_diff`` needs the model."""
        if self.method == "gradient":
            return {name: total.detach().to("cpu", copy=True) for name, total in self.totals.items()}
        if model is None:
            if self._final_scores is not None:
                return dict(self._final_scores)
            raise ValueError("weight_diff scores are computed from the model: pass `model`.")
        init = self._init_reader()
        weights = effective_weights(model, self.target)
        dtype = SCORE_DTYPES[self.score_dtype]
        return weight_diff_scores(
            init,
            weights,
            self.granularity,
            self.statistic,
            dtype=dtype,
            axes=neuron_axes(model),
            progress=self._progress,
        )

    def select_mask(self, scores: dict[str, torch.Tensor]):
        """The ``NeuronMask`` chosen from ``scores`` with this callback's selection settings."""
        from hf_align.masks import NeuronMask

        return NeuronMask.from_scores(scores, self.selection, neuron_sizes=self._neuron_sizes)

    def _join_gathers(self, model) -> None:
        """On a rank that writes nothing: take part in the per-parameter gathers rank 0's scores need."""
        if self.method == "weight_diff" and self._sharded and model is not None:
            write_snapshot("", model, self.target, write=False)

    # ------------------------------------------------------------------------------------------ gradient
    def _setup_gradient(self, model, args, zero_optimizer=None) -> None:
        self._tracked = []
        self._axes = neuron_axes(model)  # a Conv1D weight's output features ("rows") are its columns
        frozen = 0
        for name, param in model.named_parameters():
            plain = plain_name(name)
            if plain is None or not matches_target(plain, self.target):
                continue
            if param.requires_grad:
                self._tracked.append((plain, param))
            else:
                frozen += 1
        if not self._tracked:
            raise ValueError(
                "MaskAccumulationCallback(method='gradient') found no trainable base-model parameter matching "
                f"target={self.target!r} ({frozen} matching parameters are frozen). With a PEFT adapter the base "
                "weights are frozen and get no gradient: use method='weight_diff', which scores the merged weights."
            )
        self._max_grad_norm = None
        self._unwrap_step()
        if zero_optimizer is not None:
            if self.grad_stage == "post_clip":
                raise ValueError(
                    "MaskAccumulationCallback(grad_stage='post_clip') cannot run under DeepSpeed: DeepSpeed clips "
                    "inside its optimizer step, after the last point the gradients can be read. Use "
                    "grad_stage='pre_clip' (the default), or DDP / FSDP2 for post-clip gradients."
                )
            own_step = zero_optimizer.step

            def step(*step_args, **step_kwargs):
                self._deepspeed_accumulate()
                return own_step(*step_args, **step_kwargs)

            zero_optimizer.step = step
            self._wrapped_step = (zero_optimizer, own_step)
            return
        if self.grad_stage == "pre_clip" and args.max_grad_norm and args.max_grad_norm > 0:
            # The Trainer clips before `on_pre_optimizer_step`; we read first, then clip with the same norm.
            self._max_grad_norm = float(args.max_grad_norm)
            self._args = args
            args.max_grad_norm = 0.0

    def _unwrap_step(self) -> None:
        if self._wrapped_step is not None:
            zero_optimizer, _ = self._wrapped_step
            zero_optimizer.__dict__.pop("step", None)
            self._wrapped_step = None

    @torch.no_grad()
    def _deepspeed_accumulate(self) -> None:
        """Inside DeepSpeed's optimizer step: the reduced full gradients (a collective for ZeRO-2/3 partitions)."""
        from deepspeed.utils import safe_get_full_grad

        grads = {name: safe_get_full_grad(param) for name, param in self._tracked}
        present = [g for g in grads.values() if g is not None]
        if present and not math.isfinite(float(torch.nn.utils.get_total_norm(present))):
            self.skipped_steps += 1  # an fp16 overflow step DeepSpeed will skip
            return
        self._add(grads)
        self.num_steps += 1

    @torch.no_grad()
    def _fsdp_step(self, model) -> None:
        """FSDP2: gather each DTensor gradient (all ranks), score, then clip as the Trainer would have."""
        grads = {
            name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for name, p in self._tracked
        }
        local = [p.grad for p in model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(local)
        if hasattr(total_norm, "full_tensor"):
            total_norm = total_norm.full_tensor()
        if math.isfinite(float(total_norm)):
            self._add(grads)
            self.num_steps += 1
        else:
            self.skipped_steps += 1
        if self._max_grad_norm is not None and local:
            coef = min(1.0, self._max_grad_norm / (float(total_norm) + 1e-6))  # clip_grads_with_norm_'s clamp
            for grad in local:
                grad.mul_(coef)

    def _add(self, grads: dict[str, torch.Tensor | None]) -> None:
        for name, grad in grads.items():
            if grad is None:
                continue
            total = self.totals[name]
            contribution = reduce_magnitude(grad, self.granularity, self.statistic, neuron_axis(self._axes, name))
            total.add_(contribution.to(device=total.device, dtype=total.dtype))

    def _restore_clipping(self) -> None:
        if self._args is not None and self._max_grad_norm is not None:
            self._args.max_grad_norm = self._max_grad_norm
        self._args = None
        self._max_grad_norm = None

    def _zero_totals(self) -> dict[str, torch.Tensor]:
        totals = {}
        for name, param in self._tracked:
            device = "cpu" if self.offload_to_cpu else param.device
            full_shape = parameter_shape(param)  # a ZeRO-3 partition's full shape
            if self.granularity == "row":
                axis = neuron_axis(self._axes, name)
                shape, dtype = (full_shape[axis] if len(full_shape) > axis else 1,), torch.float32
            else:
                shape, dtype = full_shape, SCORE_DTYPES[self.score_dtype]
            totals[name] = torch.zeros(shape, dtype=dtype, device=device)
        return totals

    @torch.no_grad()
    def _accumulate(self) -> None:
        for name, param in self._tracked:
            if param.grad is None:
                continue
            total = self.totals[name]
            axis = neuron_axis(self._axes, name)
            contribution = reduce_magnitude(param.grad, self.granularity, self.statistic, axis)
            total.add_(contribution.to(device=total.device, dtype=total.dtype))

    # --------------------------------------------------------------------------------------- weight diff
    def _snapshot_dir(self, args) -> Path:
        if self.init_path and self._init_gguf is None:
            return Path(self.init_path)
        snapshot, old = Path(args.output_dir) / INIT_SNAPSHOT_DIR, Path(args.output_dir) / _OLD_SNAPSHOT_DIR
        return old if old.is_dir() and not snapshot.exists() else snapshot

    def _setup_weight_diff(self, model, args, state) -> None:
        self._init_dir = self._snapshot_dir(args)
        if self._init_gguf is not None:  # θ_start from a GGUF: converted once (float32 is exact) into the snapshot
            if state.is_world_process_zero and not (self._init_dir / "config.json").is_file():
                from hf_align.loading import convert_gguf

                convert_gguf(self._init_gguf, self._init_dir, dtype="float32")
            _barrier()
            return
        if self.init_path:
            if not self._init_dir.exists():
                raise FileNotFoundError(
                    f"init_path {self.init_path!r} does not exist (expected a safetensors checkpoint or a .gguf file)."
                )
            return
        if state.global_step > 0:
            if not self._init_dir.exists():
                raise FileNotFoundError(
                    f"Resuming weight_diff scoring needs the initial snapshot {str(self._init_dir)!r} written at the "
                    "start of the run; pass init_path= to point at the initial weights."
                )
            return
        if state.is_world_process_zero or self._sharded:  # sharded: every rank joins the gathers
            write_snapshot(self._init_dir, model, self.target, write=state.is_world_process_zero)
        _barrier()

    def _init_reader(self) -> CheckpointReader:
        return CheckpointReader(self._init_dir)

    # ------------------------------------------------------------------------------------------ resume
    def _restore(self, args, state) -> None:
        if self.method == "weight_diff":
            return  # weight_diff is stateless: θ_start is on disk, θ_end is the model
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None)]
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        folder = next(
            (Path(c) for c in candidates if isinstance(c, str) and (Path(c) / "neuron_scores.json").exists()), None
        )
        if folder is None:
            raise FileNotFoundError(
                f"Resuming at step {state.global_step} but no neuron scores were found in {[c for c in candidates if c]}; "
                "the running totals cannot be restored. Pass resume_from=<folder with neuron_scores.safetensors>."
            )
        scores, meta = load_scores(folder)
        for key in ("method", "granularity", "statistic"):
            if meta.get(key) != getattr(self, key):
                raise ValueError(
                    f"Scores in {str(folder)!r} were accumulated with {key}={meta.get(key)!r}, "
                    f"but this callback uses {key}={getattr(self, key)!r}."
                )
        if set(scores) != set(self.totals):
            missing = sorted(set(self.totals) ^ set(scores))[:5]
            raise ValueError(f"Scores in {str(folder)!r} cover different parameters than this run (e.g. {missing}).")
        for name, total in self.totals.items():
            if scores[name].shape != total.shape:
                raise ValueError(
                    f"Score {name!r} in {str(folder)!r} has shape {tuple(scores[name].shape)}, expected {tuple(total.shape)}."
                )
            total.copy_(scores[name].to(device=total.device, dtype=total.dtype))
        self.num_steps = int(meta.get("num_steps", 0))
        self.skipped_steps = int(meta.get("skipped_steps", 0))

    # ------------------------------------------------------------------------------------------ helpers
    def _public_init(self) -> str:
        """θ_start as the scores' header names it: the user's checkpoint by Hub id or file name, or the run's own
        snapshot folder by its name, never the writer's path (the header is uploaded with the scores)."""
        from hf_align.hub import public_value

        return public_value(str(self.init_path)) if self.init_path else self._init_dir.name

    def _meta(self, state) -> dict[str, Any]:
        return {
            "method": self.method,
            "granularity": self.granularity,
            "statistic": self.statistic,
            "grad_stage": self.grad_stage if self.method == "gradient" else None,
            "score_dtype": self.score_dtype if self.granularity == "element" else "float32",
            "target": self.target,
            "num_steps": self.num_steps,
            "skipped_steps": self.skipped_steps,
            "global_step": int(state.global_step),
            "init_path": self._public_init() if self.method == "weight_diff" else None,
            "neuron_sizes": self._neuron_sizes if self.granularity == "row" else None,
        }


def _deepspeed_optimizer(optimizer) -> Any:
    """The DeepSpeed ZeRO optimizer behind accelerate's wrapper, or None (no DeepSpeed)."""
    inner = getattr(optimizer, "optimizer", None)
    module = type(inner).__module__ if inner is not None else ""
    return inner if module.startswith("deepspeed.") else None


def _with(options, given: dict[str, Any]):
    """``options`` with the arguments that were given (not None) in place of its fields; checked when built."""
    given = {name: value for name, value in given.items() if value is not None}
    return dataclasses.replace(options, **given) if given else options


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
