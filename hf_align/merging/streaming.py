"""Streaming merge: θ = α·θ_base + (1−α)·θ_aligned, tensor by tensor, for checkpoints of any size.

Why our own safetensors reader/writer: ``safe_open`` memory-maps whole shards, and every page it touches
counts towards the process' resident memory until the shard is closed; reading each tensor with a plain
``readinto`` into a fresh buffer, and writing each output tensor as soon as it is computed (the shard layout
and header are known in advance from the input headers), keeps peak RSS at about two input tensors plus
one output tensor, whatever the model size. Files are standard safetensors; ``safe_open``/``from_pretrained``
read them.

The output directory is built in a temporary directory and renamed at the end (``hf_align.io.atomic_dir``);
every check (architecture, names, shapes, α range, and what the input folders hold: headers, index entries and
side files staying inside the folder) runs before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_align.errors import UserError
from hf_align.hub import merge_model_card, write_model_card
from hf_align.hub_download import MODEL_FILE_PATTERNS, resolve_local
from hf_align.io import (
    PathLike,
    atomic_dir,
    check_finite,
    copy_file,
    is_finite,
    read_json,
    refuse_overlap,
    resolve_inside,
    scratch_dir,
    write_json,
)
from hf_align.loading import gguf_as_checkpoints, parse_dtype
from hf_align.merging.plan import PLAN_FILE, MergePlan, linear_plan
from hf_align.progress import progress_bar
from hf_align.saving import RESTORED_CONFIG, SaveFormat, restore_saved_config


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
COPIED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|"
    r"merges\.txt|chat_template\..*|.*\.tiktoken|preprocessor_config\.json)$"
)
NOT_WEIGHTS = ("neuron_scores", "neuron_mask", "adapter_model")  # safetensors files that hold no model weights
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def parse_size(size: int | str) -> int:
    """``"500MB"``, ``"2GB"``, ``"1.5GiB"``, ``1000`` → bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"max_shard_size must look like '500MB' or '2GB' or a byte count, got {size!r}.")
        base = 1024 if match.group(3) else 1000
        unit = match.group(2).upper()
        value = int(float(match.group(1)) * (base ** ("KMGT".index(unit) + 1) if unit else 1))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return value


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: file, absolute byte range, dtype and shape (from the safetensors header)."""

    file: Path
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_info(path: Path, name: str, entry: object, base: int, size: int) -> TensorInfo:
    """One header entry checked against the format and the file: known dtype, non-negative integer shape, a byte
    range of exactly shape × element size that lies inside the file."""
    where = f"{str(path)!r}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"{where}: a header entry needs dtype, shape and data_offsets, got {entry!r:.200}.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"{where} has unsupported dtype {dtype!r:.50}.")

    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.200}.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ValueError(f"{where}: data_offsets must be [start, end] in bytes, got {offsets!r:.200}.")
    begin, end = offsets
    nbytes = math.prod(shape) * torch.empty((), dtype=_DTYPES[dtype]).element_size()
    if end - begin != nbytes:
        raise ValueError(
            f"{where}: shape {shape} {dtype} is {nbytes} bytes but data_offsets {offsets} span {end - begin}."
        )
    if base + end > size:
        raise ValueError(
            f"{str(path)!r} is truncated: tensor {name!r} ends early (data_offsets {offsets}, "
            f"{size - base} data bytes in the file)."
        )
    return TensorInfo(path, base + begin, base + end, _DTYPES[dtype], tuple(shape))


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header (no tensor data is read).

    Checked before anything uses it, so a damaged or hostile file fails here with a ``ValueError`` naming it (not a
    ``MemoryError`` from a huge declared length, a ``KeyError``, or a read of another tensor's bytes later): the
    header length against the file size, every entry (:func:`_entry_info`) and that no two byte ranges overlap.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{str(path)!r} is not a safetensors file: {size} bytes, shorter than its header.")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(
                    f"{str(path)!r} is not a safetensors file: it declares a {length}-byte header but has {size} bytes"
                    f" (limit {MAX_HEADER_BYTES})."
                )
            header = json.loads(handle.read(length))
    except OSError as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{str(path)!r} is not a safetensors file: its header is not JSON ({err}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file: its header is not a JSON object.")
    base = 8 + length
    infos = {
        name: _entry_info(path, name, entry, base, size) for name, entry in header.items() if name != "__metadata__"
    }
    ranges = sorted((info.start, info.end, name) for name, info in infos.items() if info.end > info.start)
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise ValueError(f"{str(path)!r}: the byte ranges of tensors {first!r} and {second!r} overlap.")
    return infos


def index_files(index: Path) -> list[Path]:
    """The shard files ``model.safetensors.index.json`` names, each checked to stay inside its folder."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{str(index)!r}: expected a 'weight_map' object mapping tensor names to shard file names.")
    return [resolve_inside(index.parent, entry, source=index) for entry in dict.fromkeys(weight_map.values())]


def side_files(directory: Path) -> list[Path]:
    """The config, generation config and tokenizer files of a model folder that a merge copies (``COPIED_FILES``).

    A symlink among them that resolves outside the folder (``tokenizer_config.json -> /some/secret``) is refused,
    naming it: it would be copied, as a regular file, into the merge output and on to the Hub. Hub cache snapshots,
    whose files are symlinks into the repo's ``blobs``, are fine (:func:`hf_align.io.allowed_roots`).
    """
    return [
        resolve_inside(directory, file.name)
        for file in sorted(directory.iterdir())
        if COPIED_FILES.match(file.name) and file.is_file()
    ]


class Checkpoint:
    """The safetensors tensors of a local HF model directory (sharded or not), read one tensor at a time.

    A folder is read the way ``from_pretrained`` reads it: ``model.safetensors`` if present, else the shards of
    ``model.safetensors.index.json``, else every ``*.safetensors`` file.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if self.path.is_file() and self.path.suffix == ".safetensors":
            files, self.directory = [self.path], self.path.parent
        elif (self.path / SINGLE_FILE).is_file():  # before the index, as transformers' from_pretrained reads them
            files, self.directory = [resolve_inside(self.path, SINGLE_FILE)], self.path
        elif (self.path / INDEX_FILE).is_file():
            files, self.directory = index_files(self.path / INDEX_FILE), self.path
        elif self.path.is_dir():  # hf-align's own files beside the weights are not weights
            weights = [p for p in sorted(self.path.glob("*.safetensors")) if not p.name.startswith(NOT_WEIGHTS)]
            files = [resolve_inside(self.path, p.name) for p in weights]
            self.directory = self.path
        else:
            raise FileNotFoundError(f"Checkpoint {str(self.path)!r} does not exist.")
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin")) if self.path.is_dir() else []
            hint = " (found pickle .bin weights: re-save them with save_pretrained(safe_serialization=True))"
            raise FileNotFoundError(f"No .safetensors weights in {str(self.path)!r}{hint if bins else ''}.")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.exists():
                raise FileNotFoundError(f"{str(file)!r} is listed in {INDEX_FILE} but missing.")
            infos = read_header(file)
            twice = sorted(infos.keys() & self.tensors.keys())
            if twice:
                first = self.tensors[twice[0]].file
                raise ValueError(f"Tensor {twice[0]!r} is stored twice: in {str(first)!r} and {str(file)!r}.")
            self.tensors.update(infos)
        has_config = (self.directory / "config.json").exists()
        self.config: dict = read_json(resolve_inside(self.directory, "config.json")) if has_config else {}
        self._handles: dict[Path, object] = {}

    def read(self, name: str) -> torch.Tensor:
        """A fresh (writable, not memory-mapped) tensor: ``readinto`` straight into its storage."""
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb", buffering=0)  # noqa: SIM115
        buffer = torch.empty(info.end - info.start, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        handle.seek(info.start)
        read = 0
        while read < len(view):
            n = handle.readinto(view[read:])
            if not n:
                raise ValueError(f"{str(info.file)!r} is truncated: tensor {name!r} ends early.")
            read += n
        return check_finite(buffer.view(info.dtype).reshape(info.shape), name, info.file)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- writing


@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Greedy, order-preserving packing; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; tensors are appended in order."""

    def __init__(self, path: Path, tensors: list[OutputTensor]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in tensors:
            header[t.name] = {
                "dtype": _DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.expected = iter(tensors)
        self.handle = open(path, "wb")  # noqa: SIM115
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self.expected)
        if expected.name != name or expected.dtype != tensor.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(
                f"Internal error: shard expected {expected}, got {name} {tensor.dtype} {tuple(tensor.shape)}."
            )
        self.handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        self.handle.close()


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# --------------------------------------------------------------------------------------------- resolving


def resolve_model_dir(name_or_path: PathLike, stack: contextlib.ExitStack, revision: str | None = None) -> Path:
    """A local directory for a local path or a Hub id; PEFT adapter directories are merged first.

    A Hub id is downloaded with ``huggingface_hub.snapshot_download`` (safetensors + config/tokenizer only).
    An adapter directory (``adapter_config.json``) is loaded on its base model, ``merge_and_unload``-ed and
    saved to a temporary directory (this step holds the full model in memory once).
    """
    path = resolve_local(name_or_path, revision, MODEL_FILE_PATTERNS, what="model")
    if path.is_dir() and (path / "adapter_config.json").exists():
        return _merge_adapter(path, stack)
    return path


def _merge_adapter(adapter_dir: Path, stack: contextlib.ExitStack) -> Path:
    from peft import AutoPeftModelForCausalLM

    from hf_align.loading import load_model

    copied = [file for file in side_files(adapter_dir) if file.name != "config.json"]
    model = load_model(adapter_dir, dtype="auto", architecture=AutoPeftModelForCausalLM).merge_and_unload()
    target = stack.enter_context(scratch_dir(Path(tempfile.gettempdir()) / "hf_align_merged_adapter"))
    model.save_pretrained(target)
    for file in copied:
        copy_file(file, target / file.name)
    del model
    return target


# --------------------------------------------------------------------------------------------- merging


@dataclass
class MergeResult:
    output_dir: Path
    plan: MergePlan
    num_tensors: int
    num_shards: int
    total_bytes: int


def validate_pair(base: Checkpoint, aligned: Checkpoint) -> None:
    """Same architecture, same tensor names and shapes; raise naming the first differences."""
    base_type, aligned_type = base.config.get("model_type"), aligned.config.get("model_type")
    if base_type and aligned_type and base_type != aligned_type:
        raise ValueError(
            f"Architectures differ: base {str(base.path)!r} is model_type {base_type!r}, aligned "
            f"{str(aligned.path)!r} is {aligned_type!r}."
        )
    only_base = sorted(set(base.tensors) - set(aligned.tensors))
    only_aligned = sorted(set(aligned.tensors) - set(base.tensors))
    if only_base or only_aligned:
        raise ValueError(
            f"Tensor names differ: missing in aligned {str(aligned.path)!r}: {only_base[:5]}; missing in base "
            f"{str(base.path)!r}: {only_aligned[:5]}."
        )
    shapes = [
        f"{n}: base {base.tensors[n].shape} vs aligned {aligned.tensors[n].shape}"
        for n in aligned.tensors
        if base.tensors[n].shape != aligned.tensors[n].shape
    ]
    if shapes:
        raise ValueError(f"Tensor shapes differ ({len(shapes)}): {shapes[:5]}.")


def merge_tensor(
    base: torch.Tensor | None, aligned: torch.Tensor | None, alpha: float, dtype: torch.dtype | None
) -> torch.Tensor:
    """α·base + (1−α)·aligned as ``aligned.lerp_(base, α)`` (α=0/1: the input itself, exactly).

    Computed in the widest of the two input dtypes and ``dtype``, then cast once to ``dtype``: bf16 inputs merged
    into a float32 output keep float32 precision (not a bf16 result cast up), bf16 into float16 is rounded once
    (torch computes a bf16/fp16 lerp in fp32 and rounds once). Mixed input dtypes go through the wider one (fp32).
    Non-float tensors are taken from the side with the larger weight.
    """
    if alpha == 0.0 or (aligned is not None and not aligned.is_floating_point() and alpha < 0.5):
        out = aligned
    elif alpha == 1.0 or not base.is_floating_point():
        out = base
    else:
        compute = torch.promote_types(base.dtype, aligned.dtype)
        compute = compute if dtype is None else torch.promote_types(compute, dtype)
        out = aligned.to(compute).lerp_(base.to(compute), alpha)
    if dtype is not None and out.is_floating_point() and out.dtype != dtype:
        out = out.to(dtype)
    return out


def _output_dtype(info: TensorInfo, base_info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` when asked; else the base model's (issue #29.3: an aligned copy saved in float32 does not double
    the merge); mixed inputs are computed in the wider dtype and rounded once."""
    if not info.dtype.is_floating_point:
        return info.dtype
    if dtype is not None:
        return dtype
    return base_info.dtype if base_info.dtype.is_floating_point else info.dtype


def _base_config_values(base_dir: Path, out_dtype: torch.dtype | None, outputs: list) -> SaveFormat:
    """What the merge's ``config.json`` (copied from the aligned model) takes from the base: the dtype of the merged
    weights and ``use_cache`` (an aligned model saved while training may carry ``use_cache: false``)."""
    stored = read_json(base_dir / "config.json") if (base_dir / "config.json").is_file() else {}
    floating = [t.dtype for t in outputs if t.dtype.is_floating_point]
    dtype = out_dtype or (max(set(floating), key=floating.count) if floating else None)
    return SaveFormat(dtype, {k: stored[k] for k in RESTORED_CONFIG if k in stored})


def _copy_side_files(files: list[Path], target: Path, dtype: torch.dtype | None) -> None:
    for file in files:
        copy_file(file, target / file.name)
    if dtype is not None and (target / "config.json").exists():
        config = read_json(target / "config.json")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = str(dtype).removeprefix("torch.")
        write_json(target / "config.json", config)


def merge_models(
    base: PathLike,
    aligned: PathLike,
    output_dir: PathLike,
    alpha: float | None = None,
    plan: MergePlan | Callable[[list[str], dict], MergePlan] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "500MB",
    overwrite: bool = False,
    progress: bool = True,
    revision: str | None = None,
    plot: bool = False,
) -> MergeResult:
    """Write θ = α·θ_base + (1−α)·θ_aligned to ``output_dir`` (HF layout, sharded), streaming tensor by tensor.

    Give either ``alpha`` (linear) or ``plan``: a :class:`MergePlan` or a function ``(tensor_names, config) →
    MergePlan`` (how the CLI builds partwise plans once the names are known). ``base``/``aligned``: local
    directories, ``.safetensors`` files, Hub ids, PEFT adapter directories or ``.gguf`` files (converted once into
    a temporary float32 folder, removed at the end; like an adapter's merge, this holds the model in memory once). Config, generation config and
    tokenizer files are copied from ``aligned`` (with the base's ``use_cache``); ``dtype`` ``None``/``"auto"``: the
    base model's dtype, per tensor; the plan is saved as ``merge_plan.json`` (and with ``plot``, its α
    per block as ``merge_alphas.png``, which needs matplotlib). Peak memory: about two input tensors plus one output tensor (the largest ones).
    """
    if (alpha is None) == (plan is None):
        raise ValueError("Pass exactly one of alpha (linear merge) or plan (a MergePlan or a plan builder).")
    if plot:
        from hf_align.plots import ALPHA_PLOT_FILE, matplotlib_available, plot_merge_alphas

        if not matplotlib_available():
            raise ImportError("merge_models(plot=True) needs matplotlib: pip install 'hf-align[plots]'.")
    out_dtype = parse_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    output_dir = Path(output_dir)
    # overwrite=True swaps the merge in: an output that is (or holds) an input would delete the user's model
    refuse_overlap({"output_dir": output_dir}, {"base": base, "aligned": aligned}, allow_inside=True)
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(
            f"Output directory {str(output_dir)!r} already exists and is not empty; pass overwrite=True."
        )
    with contextlib.ExitStack() as stack:
        base_dir, aligned_dir = gguf_as_checkpoints(stack, base, aligned)  # both headers checked, then converted
        base_ckpt = stack.enter_context(Checkpoint(resolve_model_dir(base_dir, stack, revision)))
        aligned_ckpt = stack.enter_context(Checkpoint(resolve_model_dir(aligned_dir, stack, revision)))
        validate_pair(base_ckpt, aligned_ckpt)
        copied = side_files(aligned_ckpt.directory)  # checked before anything is written
        names = sorted(
            aligned_ckpt.tensors, key=lambda n: (str(aligned_ckpt.tensors[n].file), aligned_ckpt.tensors[n].start)
        )
        if alpha is not None:
            plan = linear_plan(names, alpha)
        elif callable(plan) and not isinstance(plan, MergePlan):
            plan = plan(names, aligned_ckpt.config)
        missing = [n for n in names if n not in plan]
        if missing:
            raise ValueError(f"The merge plan has no α for tensor(s) {missing[:5]} ({len(missing)} in all).")
        outputs = [
            OutputTensor(
                n,
                _output_dtype(aligned_ckpt.tensors[n], base_ckpt.tensors[n], out_dtype),
                aligned_ckpt.tensors[n].shape,
            )
            for n in names
        ]
        shards = plan_shards(outputs, shard_limit)
        files = shard_names(len(shards))
        total = sum(t.nbytes for t in outputs)
        bar = progress_bar(desc="merging", unit="B", total=total, enabled=progress, unit_scale=True)
        with atomic_dir(output_dir, overwrite=overwrite) as tmp:
            for file, shard in zip(files, shards):
                writer = ShardWriter(tmp / file, shard)
                try:
                    for tensor in shard:
                        a = plan[tensor.name]
                        base_t = base_ckpt.read(tensor.name) if a != 0.0 else None
                        aligned_t = aligned_ckpt.read(tensor.name) if a != 1.0 else None
                        merged = merge_tensor(base_t, aligned_t, a, tensor.dtype)
                        if not is_finite(merged):  # the inputs are finite: the output dtype overflowed
                            raise UserError(
                                f"merge into {str(output_dir)!r}: tensor {tensor.name!r} (α={a}) is not finite in "
                                f"{tensor.dtype} (overflow); merge into a wider dtype. Nothing was written."
                            )
                        writer.write(tensor.name, merged)
                        del base_t, aligned_t
                        bar.update(tensor.nbytes)
                finally:
                    writer.close()
            if len(files) > 1:
                weight_map = {t.name: file for file, shard in zip(files, shards) for t in shard}
                write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
            _copy_side_files(copied, tmp, out_dtype)
            restore_saved_config(tmp, _base_config_values(base_ckpt.directory, out_dtype, outputs))
            plan.save(tmp / PLAN_FILE)
            if plot:
                plot_merge_alphas(plan, tmp / ALPHA_PLOT_FILE)
            card = merge_model_card(str(base), str(aligned), plan, repo=f"./{output_dir.name}")
            write_model_card(card, tmp)  # not the aligned model's card
        bar.close()
    return MergeResult(output_dir, plan, len(outputs), len(files), total)


def iter_tensors(path: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a local checkpoint, one at a time (for checks and benchmarks)."""
    with Checkpoint(path) as ckpt:
        for name in ckpt.tensors:
            yield name, ckpt.read(name)


__all__ = [
    "Checkpoint",
    "MergeResult",
    "iter_tensors",
    "merge_models",
    "merge_tensor",
    "parse_dtype",
    "parse_size",
    "resolve_model_dir",
]
