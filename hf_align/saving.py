"""What a saved model looks like: the base model's dtype and config, written all or nothing.

TRL loads a model given by name in float32 (its default ``dtype``) and ``transformers.Trainer`` sets
``config.use_cache = False`` for training; saved as they are, a bf16 base comes back at twice its size with a
config that disables the KV cache. :class:`SaveFormat` records, before training, the dtype the base was loaded in
(the checkpoint's own dtype unless the user asked for one) and the config values training changes;
:func:`saving_as` applies them to every ``save_pretrained`` of the model, casting the state dict it writes (never
the live weights, so training precision is untouched).

:func:`all_or_nothing` is the final save's folder rule: write into a temporary folder inside ``output_dir``, then
move the files in (weights first, ``config.json`` last); a failure (disk full, permissions) leaves the previous
contents as they were and says in one line what failed and how much space the save needs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_align.errors import UserError
from hf_align.io import PathLike, apply_file_mode, atomic_file


__all__ = ["SaveFormat", "all_or_nothing", "cast_floating", "estimated_save_bytes", "save_format_of", "saving_as"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
RESTORED_CONFIG = ("use_cache",)
"""Config fields training changes (``Trainer`` sets ``use_cache = args.use_cache``) and a save restores."""
TEMP_NAME = ".hf-align-saving.tmp"
"""The final save's temporary folder, inside ``output_dir`` (same disk, and under the output's lock)."""


@dataclass(frozen=True)
class SaveFormat:
    """The dtype a save writes floating tensors in (None: as they are) and the config values it restores."""

    dtype: torch.dtype | None = None
    config: dict[str, Any] = field(default_factory=dict)


def _as_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    return _DTYPES.get(str(value).removeprefix("torch.")) if value is not None else None


def save_format_of(model: Any, init_kwargs: dict | None = None, revision: str | None = None) -> SaveFormat:
    """The format of ``model`` as it comes to a trainer, before the trainer changes it.

    A loaded model: its dtype and config. A name: the dtype of ``init_kwargs["dtype"]`` when the user gave one
    (``"auto"``: the checkpoint's), else the checkpoint's own (``config.json``'s ``dtype``/``torch_dtype``, read
    without running any code); a config that cannot be read (GGUF, no network) leaves the dtype as loaded.
    """
    if isinstance(model, torch.nn.Module):
        config = getattr(model, "config", None)
        values = {k: getattr(config, k) for k in RESTORED_CONFIG if hasattr(config, k)}
        return SaveFormat(getattr(model, "dtype", None), values)
    init_kwargs = init_kwargs or {}
    explicit = _as_dtype(init_kwargs.get("dtype"))
    revision = revision or init_kwargs.get("revision")
    try:
        from transformers import PretrainedConfig

        stored, _ = PretrainedConfig.get_config_dict(str(model), revision=revision)
    except (OSError, ValueError):
        stored = {}
    dtype = explicit or _as_dtype(stored.get("dtype", stored.get("torch_dtype")))
    return SaveFormat(dtype, {k: stored[k] for k in RESTORED_CONFIG if k in stored})


def cast_floating(state_dict: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """``state_dict`` with floating tensors in ``dtype``; tensors that shared storage (tied embeddings) still share
    it, so ``save_pretrained`` drops the tied copy as before."""
    if dtype is None:
        return state_dict
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != dtype:
            key = id(tensor) if tensor.device.type == "meta" else tensor.untyped_storage().data_ptr()
            key = (key, tensor.storage_offset(), tuple(tensor.shape))
            if key not in cast:
                cast[key] = tensor.detach().to(dtype)
            tensor = cast[key]
        out[name] = tensor
    return out


def restore_saved_config(folder: PathLike, fmt: SaveFormat) -> None:
    """Put ``fmt``'s dtype and config values into ``folder/config.json``, and the base model's Hub id (never a
    local path) into ``adapter_config.json``'s ``base_model_name_or_path``."""
    from hf_align.hub import hub_id

    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        dtype = {"dtype": str(fmt.dtype).removeprefix("torch.")} if fmt.dtype else {}
        if dtype and "torch_dtype" in config:  # an older config's spelling, kept in step
            dtype["torch_dtype"] = dtype["dtype"]
        updates = {**fmt.config, **dtype}
        if any(config.get(k) != v for k, v in updates.items()):
            _write_json(config_path, {**config, **updates})
    adapter_path = folder / "adapter_config.json"
    if adapter_path.is_file():
        adapter = json.loads(adapter_path.read_text())
        base = adapter.get("base_model_name_or_path")
        if base and hub_id(base) != base:
            _write_json(adapter_path, {**adapter, "base_model_name_or_path": hub_id(base)})


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path, "w") as handle:  # transformers' layout: indent 2, sorted keys, final newline
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def saving_as(model: torch.nn.Module, fmt: SaveFormat | None) -> Iterator[None]:
    """Every ``model.save_pretrained`` inside the block writes ``fmt``: floating tensors cast to its dtype (from the
    state dict it is given, or the model's), then its config values restored (:func:`restore_saved_config`)."""
    if fmt is None:
        yield
        return
    original = model.save_pretrained

    def save_pretrained(save_directory, *args, state_dict=None, **kwargs):
        if fmt.dtype is not None:
            state_dict = cast_floating(state_dict if state_dict is not None else model.state_dict(), fmt.dtype)
        result = original(save_directory, *args, state_dict=state_dict, **kwargs)
        if kwargs.get("is_main_process", True):
            restore_saved_config(save_directory, fmt)
        return result

    model.save_pretrained = save_pretrained
    try:
        yield
    finally:
        vars(model).pop("save_pretrained", None)


def estimated_save_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the weights a save of ``model`` writes: each distinct tensor once (tied ones once), in ``dtype`` when
    floating (else as it is); a PEFT model writes its adapter (its trainable tensors) only."""
    from accelerate.utils import is_peft_model

    tensors = [p for p in model.parameters() if p.requires_grad] if is_peft_model(model) else model.state_dict()
    tensors = tensors.values() if isinstance(tensors, dict) else tensors
    seen, total = set(), 0
    for tensor in tensors:
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        size = torch.empty((), dtype=dtype).element_size() if dtype and tensor.is_floating_point() else None
        total += tensor.numel() * (size or tensor.element_size())
    return total


def _storage_key(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's memory, so tied tensors count once: a sharded (FSDP2) ``DTensor`` by its local
    shard (the wrapper has no storage of its own); a tensor whose storage cannot be read, by identity."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    try:
        return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(tensor.shape))
    except RuntimeError:
        return (id(tensor),)


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def _order(name: str) -> tuple[int, str]:
    """Move order: weights and everything else first, the files that make a folder look loadable last."""
    last = ("model.safetensors.index.json", "adapter_config.json", "config.json")
    return (last.index(name) + 1 if name in last else 0, name)


@contextlib.contextmanager
def all_or_nothing(output_dir: PathLike, needed_bytes: int = 0, main_process: bool = True) -> Iterator[Path]:
    """A temporary folder inside ``output_dir`` for a final save; on success its files replace those of
    ``output_dir`` (weights first, ``config.json`` last; stale weight shards of an earlier save removed after), on
    an ``OSError`` it is removed and a one-line :class:`UserError` says what failed and how much space the save
    needs (``needed_bytes``) against what the disk has free. ``main_process``: only it creates, moves and removes
    (the others write their parts, as ``save_model`` does under DeepSpeed/FSDP)."""
    output_dir = Path(output_dir)
    tmp = output_dir / TEMP_NAME
    if main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if main_process:
            _move_in(tmp, output_dir)
    except OSError as err:
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(output_dir).free if output_dir.exists() else 0
        reason = err.strerror or str(err) or type(err).__name__
        code = f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else ""
        need = f"; the save needs about {_gb(needed_bytes)}, {_gb(free)} are free there" if needed_bytes else ""
        raise UserError(
            f"saving the model to {str(output_dir)!r} failed: {reason}{code}{need}. The previous contents of the "
            "folder are as they were; free space (or fix the permissions) and resume from the last checkpoint."
        ) from err
    finally:
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)


def _move_in(tmp: Path, output_dir: Path) -> None:
    """Replace ``output_dir``'s entries by ``tmp``'s (renames on one disk: no space needed, none half-written);
    weight files of an earlier save that this one does not write (other shard counts) are removed afterwards."""
    import re

    names = sorted((p.name for p in tmp.iterdir()), key=_order)
    for name in names:
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            old = output_dir / f".{name}.{os.getpid()}.old"
            os.replace(target, old)
            os.replace(tmp / name, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / name, target)
    weights = re.compile(r"(model|adapter_model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
    written = {m[1] for m in map(weights.fullmatch, names) if m}
    for stale in output_dir.iterdir():
        match = weights.fullmatch(stale.name)
        if match and match[1] in written and stale.name not in names and stale.is_file():
            stale.unlink()
    apply_file_mode(output_dir)
