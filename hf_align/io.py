"""Safe, atomic file output: everything hf-align writes goes through here.

Rules (see DESIGN.md): safetensors + JSON only (never pickle); write to a temporary path next to
the target, then rename, so a crash or kill never leaves a half-written file or directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


PathLike = str | os.PathLike


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only when the block finishes without error.

    With ``overwrite=False`` an existing non-empty ``path`` is an error (raised before anything is
    written); with ``overwrite=True`` it is replaced as a whole at the end.
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"Output directory {str(path)!r} already exists and is not empty; pass overwrite=True.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(*paths: PathLike) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``paths``; all replace their targets only when the block succeeds.

    For files that belong together (tensors + their JSON header): a failure while writing any of them (disk full,
    kill) leaves every previous file untouched. The renames themselves happen back to back at the end; readers
    detect the one remaining window (a crash between two renames) with a shared save id, see :func:`new_save_id`.
    """
    targets = [Path(p) for p in paths]
    temps = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp, target in zip(temps, targets, strict=True):
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        for parent in {t.parent for t in targets}:
            _fsync_dir(parent)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def new_save_id() -> str:
    """A random id written into both files of a pair, so a reader can tell they come from the same save."""
    import uuid

    return uuid.uuid4().hex


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (empty when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def check_same_save(
    tensors_path: PathLike, json_path: PathLike, save_id: str | None, metadata: dict[str, str] | None = None
) -> None:
    """Both files of a pair written with :func:`atomic_files` carry one save id; files from older saves carry none.

    ``metadata``: the safetensors header's metadata when the caller already read it.
    """
    stored = (metadata if metadata is not None else safetensors_metadata(tensors_path)).get("save_id")
    if save_id is not None and stored is not None and stored != save_id:
        raise ValueError(
            f"{str(tensors_path)!r} and {str(json_path)!r} come from different saves (interrupted write?); save again."
        )


def write_json(path: PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: PathLike) -> Any:
    """Read JSON with an error that names the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"Expected a JSON file at {str(path)!r}, but it does not exist.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None


def save_tensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, metadata values as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_tensors(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file with an error that names the file when it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Expected a safetensors file at {str(path)!r}, but it does not exist.")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file (truncated or corrupt?): {err}") from None
