"""Safe, atomic file output: everything hf-align writes goes through here.

Rules (see DESIGN.md): safetensors + JSON only (never pickle); write to a temporary path next to
the target, then rename, so a crash or kill never leaves a half-written file or directory. Temporary names
carry the writer's process id (``.<target>.<pid>.<random>.tmp``): the next write of the same target removes the
ones whose process is gone (a killed run), and nothing else. Readers of a model folder check that every file
they open stays inside it (:func:`resolve_inside`).

What we write ends with the mode a plain ``open()``/``mkdir`` gives under the current umask (:func:`file_mode`,
:func:`dir_mode`; :func:`apply_file_mode` for weights the ``safetensors`` library left 0600), and every tensor we
read back is checked finite as it is read (:func:`check_finite`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hf_align.errors import UserError


PathLike = str | os.PathLike
logger = logging.getLogger(__name__)
_RANDOM = "[a-z0-9_]{8}"  # tempfile's random part


def process_alive(pid: Any) -> bool:
    """Whether process ``pid`` of this host still runs; an unknown pid (not a positive integer) counts as alive, so
    nothing it may own is ever taken over or cleaned."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours to signal
        return True
    return True


def clean_stale_temps(path: PathLike) -> list[Path]:
    """Remove what our writers left beside ``path`` when their process was killed: ``.<name>.<pid>.<random>.tmp``
    (a partial file or merge folder) and ``.<name>.<pid>.<random>.old`` (a replaced output not yet deleted), only for
    processes that no longer run. An ``.old`` folder is kept, with a warning, while ``path`` is missing: a kill
    between the two renames of :func:`atomic_dir` leaves the previous output in it. Returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.{_RANDOM}\.(tmp|old)")
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if not match or process_alive(int(match.group(1))):
                continue
            if match.group(2) == "old" and not path.exists():
                logger.warning(f"{str(entry)!r} holds the previous {path.name!r} of an interrupted write; kept.")
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux: ``/proc/self/status``); elsewhere
    set and restored at once (``os.umask`` has no read-only form)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file now: ``0o666 & ~umask``. Our temporaries are created
    private (``mkstemp``: 0600, ``mkdtemp``: 0700) and get this mode (:func:`dir_mode` for folders) before the
    rename, so what we write is as readable as what transformers writes beside it, no more and no less."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a plain ``mkdir`` gives a new folder now: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def apply_file_mode(folder: PathLike) -> list[Path]:
    """Give the ``*.safetensors`` files under ``folder`` that their writer left private the umask's mode.

    The ``safetensors`` library (0.8) writes every file 0600 whatever the umask, so weights saved through
    transformers' ``save_pretrained`` (or huggingface_hub's, or PEFT's) were unreadable to the group a plain
    ``open()`` would have let read them, while the rest of the folder was not. Called after every save of ours
    (:func:`hf_align.callbacks.json_training_args.replace_training_args_pickle`, the trainers' save); only files
    still at 0600 that this user owns are touched. Returns them.
    """
    mode, changed = file_mode(), []
    if mode == 0o600:
        return changed
    for path in Path(folder).rglob("*.safetensors"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid():
                os.chmod(path, mode)
                changed.append(path)
    return changed


def copy_file(source: PathLike, target: PathLike) -> None:
    """Copy the contents only: the copy gets the umask's mode, not the source's (``shutil.copy2`` would keep a
    source's 0600 or 0755)."""
    shutil.copyfile(source, target)


def _temp_beside(path: Path, directory: bool = False, suffix: str = ".tmp") -> Path:
    """A fresh temporary file (closed) or directory beside ``path``, after removing stale ones of killed runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    prefix = f".{path.name}.{os.getpid()}."
    if directory:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(tmp)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def allowed_roots(folder: PathLike) -> list[Path]:
    """Where files of ``folder`` may resolve to: the folder itself and, for a Hub cache snapshot
    (``models--org--name/snapshots/<rev>``, whose files are symlinks into ``../../blobs``), that repo's blobs."""
    real = Path(folder).resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.count("--") >= 1:
        blobs = real.parent.parent / "blobs"
        if blobs.is_dir():
            roots.append(blobs.resolve())
    return roots


def resolve_inside(folder: PathLike, entry: str, source: PathLike | None = None) -> Path:
    """``folder / entry``, refusing an entry that leaves the folder: absolute, with ``..``, or a symlink resolving
    outside it (a Hub cache snapshot's own blobs excepted, see :func:`allowed_roots`). ``source``: the file that
    named ``entry`` (an index), for the message; without it the message names the file itself."""
    folder = Path(folder)
    where = f"{str(source)!r} lists {entry!r}" if source is not None else f"{str(folder / entry)!r}"
    if not isinstance(entry, str) or not entry or Path(entry).is_absolute() or ".." in Path(entry).parts:
        raise UserError(f"{where}: not a relative path inside {str(folder)!r}; refusing to read it.")
    target = folder / entry
    if not _inside(target.resolve(), allowed_roots(folder)):
        raise UserError(f"{where}, which resolves outside {str(folder)!r} (symlink?); refusing to read it.")
    return target


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
    tmp = _temp_beside(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
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
    tmp = _temp_beside(path, directory=True)
    try:
        yield tmp
        os.chmod(tmp, dir_mode())
        if path.exists():
            old = _temp_beside(path, directory=True, suffix=".old")
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
def scratch_dir(path: PathLike) -> Iterator[Path]:
    """A temporary directory named after ``path`` (``.<name>.<pid>.<random>.tmp`` beside it), removed on exit.

    For working copies that are never renamed into place (a merged adapter, a model saved to be merged): named
    like our other temporaries, so the next call removes one that a killed run left behind.
    """
    tmp = _temp_beside(Path(path), directory=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
            temps.append(_temp_beside(target))
        yield temps
        for tmp, target in zip(temps, targets, strict=True):
            os.chmod(tmp, file_mode())
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
        raise UserError(
            f"{str(tensors_path)!r} and {str(json_path)!r} come from different saves (interrupted write?); save again."
        )


def write_json(path: PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


PARAMETER_ORDER = "parameter_order"
"""Header key of a mask or score set: its parameter names in the model's order (the files list them sorted)."""


def saved_order(header: dict[str, Any], path: PathLike) -> list[str] | None:
    """The ``parameter_order`` list of a header (None in files written before it existed); checked."""
    order = header.get(PARAMETER_ORDER)
    if order is not None and not (isinstance(order, list) and all(isinstance(name, str) for name in order)):
        raise UserError(f"{str(path)!r}: {PARAMETER_ORDER} must be a list of parameter names, got {order!r}.")
    return order


def read_text(path: PathLike, what: str = "file") -> str:
    """A text file's contents; one line naming ``what`` and the file when it is missing or not UTF-8 text (a binary
    file, a wrong encoding), instead of a bare ``UnicodeDecodeError``."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file.") from None
    except IsADirectoryError:
        raise UserError(f"{what} {str(path)!r} is a folder, not a file.") from None
    except UnicodeDecodeError as err:
        raise UserError(
            f"{what} {str(path)!r} is not a UTF-8 text file (byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}); is it the right file?"
        ) from None


def read_json(path: PathLike, what: str | None = None) -> Any:
    """Read JSON with an error that names the file (and the line and column) when it is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Expected a JSON file at {str(path)!r}, but it does not exist.")
    try:
        return json.loads(read_text(path, what or "JSON file"))
    except json.JSONDecodeError as err:
        raise UserError(f"{str(path)!r} is not valid JSON: {err}") from None


def _strict_yaml_loader():
    """``yaml.SafeLoader`` (what TRL reads recipes with: no Python objects) that refuses a key given twice in one
    mapping, which a plain loader silently resolves to the last value; YAML's own ``<<:`` override stays allowed."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        source = "<yaml>"

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise UserError(
                            f"{self.source!r}, line {line}: key {key!r} is given twice (first on line {seen[key]}); "
                            "a YAML/JSON loader would silently keep the last one. Remove one."
                        )
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor says so
                    continue
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_yaml(path: PathLike, what: str = "recipe") -> Any:
    """Read YAML or JSON (``safe_load``'s rules, no Python objects) with one line naming ``what``, the file, the line
    and the column of a syntax error (YAML counts from 0, editors from 1) or of a key given twice."""
    import yaml

    path = Path(path)
    loader = _strict_yaml_loader()(read_text(path, what))
    loader.source = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{what} {str(path)!r}{where}: not valid YAML ({problem}).") from None
    finally:
        loader.dispose()


def require_keys(data: Any, keys: Iterable[str], path: PathLike, what: str = "key") -> None:
    """``data`` must be a JSON object (or a table's columns) holding every one of ``keys``: one error that names
    the file and every missing key, instead of a bare ``KeyError`` later."""
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}.")
    missing = [key for key in keys if key not in data]
    if missing:
        raise UserError(f"{str(path)!r} is missing the {what}(s) {missing}: it was not written by this version.")


def save_tensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, metadata values as strings)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN/±inf, in one pass without a tensor-sized temporary: a float64 sum is finite
    exactly when every entry is (a NaN or inf propagates; finite fp32/fp16/bf16 values cannot overflow float64)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype == torch.float64 or tensor.element_size() == 1:  # float64 could overflow its own sum; fp8
        return bool(torch.isfinite(tensor.to(torch.float64) if tensor.element_size() == 1 else tensor).all())
    return math.isfinite(float(tensor.sum(dtype=torch.float64)))


def check_finite(tensor: torch.Tensor, name: str, source: PathLike | str) -> torch.Tensor:
    """``tensor`` itself, or a :class:`~hf_align.errors.UserError` naming ``source`` (the file) and ``name``.

    Called on every tensor hf-align reads back (deltas, masks, scores, α's, merge inputs) and on every merge output,
    as it is read or computed: a NaN would otherwise train on silently (loss 0.0, grad_norm nan) or be published.
    """
    if is_finite(tensor):
        return tensor
    values = tensor.detach().to(torch.float32)
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    raise UserError(
        f"{str(source)!r}: tensor {name!r} holds {nan} NaN and {inf} ±inf of {tensor.numel()} values; refusing to "
        "use it (re-create the file from a finite run)."
    )


def load_tensors(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file tensor by tensor, each checked finite (:func:`check_finite`); errors name the file
    when it is missing or corrupt, and the file and tensor when a value is NaN/inf."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Expected a safetensors file at {str(path)!r}, but it does not exist.")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                tensors[name] = handle.get_tensor(name)
                if not is_finite(tensors[name]):
                    break
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{str(path)!r} is not a valid safetensors file (truncated or corrupt?): {err}") from None
    for name, tensor in tensors.items():
        check_finite(tensor, name, path)
    return tensors


# ------------------------------------------------------------------------------------- inputs stay read-only
def overlap(output: PathLike, source: PathLike) -> str | None:
    """How ``output`` relates to the local input ``source`` (symlinks resolved): ``"is"``, ``"contains"``, ``"lies
    inside"``, or ``None`` when apart or when ``source`` is not a local path (a Hub id)."""
    if not os.fspath(source) or not Path(source).exists():
        return None
    out, src = Path(output).resolve(), Path(source).resolve()
    if out == src:
        return "is"
    if src.is_relative_to(out):
        return "contains"
    return "lies inside" if out.is_relative_to(src) else None


def refuse_overlap(
    outputs: dict[str, PathLike | None], inputs: dict[str, PathLike | None], allow_inside: bool = False
) -> None:
    """Refuse, naming both, an output (``{label: path}``) that is, contains or lies inside an input: writing it
    would replace (or, for an ``atomic_dir`` swap, remove) what the command reads. Called before anything loads.
    ``allow_inside``: a new subfolder of an input is fine (the Python API; a callback writes beside its checkpoints)."""
    for out_label, output in outputs.items():
        for in_label, source in inputs.items():
            relation = overlap(output, source) if output and source else None
            if relation and not (allow_inside and relation == "lies inside"):
                raise UserError(
                    f"{out_label} {str(output)!r} {relation} the input {in_label} {str(source)!r}: hf-align never "
                    f"writes over what it reads; choose another {out_label}."
                )


# --------------------------------------------------------------------------------------- one writer per output
def lock_path(output: PathLike) -> Path:
    """The lock of ``output`` (a folder or a file, existing or not): ``.<name>.lock`` beside it, symlinks resolved,
    so that every spelling of one output shares one lock and replacing the output as a whole keeps it."""
    real = Path(output).resolve()
    return real.parent / f".{real.name}.lock"


_HELD: dict[Path, int] = {}
"""The output locks this process holds (lock path → depth): a command inside a command (a pipeline naming its
folder twice) re-enters its own lock instead of waiting on itself."""


@contextlib.contextmanager
def output_lock(output: PathLike, who: str = "hf-align") -> Iterator[Path]:
    """Hold the lock of ``output`` (:func:`lock_path`, a ``filelock.FileLock``: the OS frees it when its holder
    dies) while writing it; the lock file holds the writer's host, pid and command. A second writer gets one line
    naming that pid; a lock file left by a process that no longer holds it is taken over with a warning. Re-entrant
    within one process. ``who``: the writer's command, for the other writer's message."""
    import socket
    import warnings

    from filelock import FileLock, Timeout

    path = lock_path(output)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    lock = FileLock(str(path), timeout=0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except PermissionError as err:
        raise UserError(
            f"{str(output)!r}: cannot create its lock {str(path)!r} ({err.strerror}); every output is locked beside "
            "it, so its folder must be writable."
        ) from None
    except Timeout:
        holder = _lock_holder(path)
        raise FileExistsError(
            f"{str(output)!r} is being written by pid {holder.get('pid', '?')} on {holder.get('host', '?')!r} "
            f"({holder.get('who', 'another writer')}; lock {str(path)!r}): one writer per output, wait for it."
        ) from None
    _HELD[path] = 1
    try:
        stale = _lock_holder(path)
        if stale.get("pid") not in (None, os.getpid()):
            state = "no longer running" if not process_alive(stale.get("pid")) else "no longer holding it"
            warnings.warn(
                f"Taking over the stale lock {str(path)!r} of pid {stale.get('pid')} ({state}).", stacklevel=3
            )
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "who": who}))
        yield path
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            path.unlink()
        lock.release()
        for folder in created:  # a refused command leaves no empty folders behind (rmdir keeps a non-empty one)
            with contextlib.suppress(OSError):
                folder.rmdir()


def _lock_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):  # empty, unreadable or half-written: no pid to name
        return {}
    return holder if isinstance(holder, dict) else {}
