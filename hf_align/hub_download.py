"""Where a reader's files are: a local path, or a Hub repo id fetched through ``huggingface_hub``'s download API.

One resolver for every hf-align reader (masks, deltas, scores, data pools, α's, merge inputs), below them all: it
imports none of them, so each can import it (:mod:`hf_align.hub`, which writes cards about them, re-exports it).
"""

from __future__ import annotations

import re
from pathlib import Path

from hf_align.errors import UserError
from hf_align.io import PathLike


__all__ = ["MODEL_FILE_PATTERNS", "resolve_local", "split_revision"]

MODEL_FILE_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""What a model download needs: weights, configs, tokenizer files (no pickled ``*.bin``, no ``*.pt``)."""
_REPO_PATH = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(/[\w.-]+)*)$")


def split_revision(name_or_path: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``: a flag or a recipe names a revision in one string. An explicit
    ``revision`` must not contradict the suffix."""
    name, sep, suffix = str(name_or_path).rpartition("@")
    if not sep or not _REPO_PATH.match(name) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", suffix):
        return str(name_or_path), revision
    if revision is not None and revision != suffix:
        raise UserError(f"{name_or_path!r} names revision {suffix!r} but revision={revision!r} was also given.")
    return name, suffix


def resolve_local(
    name_or_path: PathLike,
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
    what: str = "artifact",
) -> Path:
    """A local path for what an hf-align reader reads: the path itself when it exists here, else a Hub repo id
    fetched with ``huggingface_hub.snapshot_download`` into its cache (``HF_HUB_OFFLINE=1`` reads the cache alone).

    Spellings: ``org/name``, ``org/name@revision``, ``org/name/sub/folder`` (an artifact saved in a subfolder of
    a repo, e.g. the warm-up's ``neuron_mask`` or the feedback trainer's ``data_pool``). ``allow_patterns``: the
    files the reader needs (relative to that subfolder), so nothing else is downloaded. Every reader of a mask,
    deltas, scores, a data pool or a model folder goes through here; ``what`` names the artifact in errors.
    """
    local = Path(name_or_path).expanduser()
    if local.exists():
        return local
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns or [])
    name, revision = split_revision(str(name_or_path), revision)
    match = _REPO_PATH.match(name)
    if match is None or name.startswith(".") or ".." in name.split("/"):
        holding = f" with {', '.join(patterns)}" if patterns else ""
        raise FileNotFoundError(
            f"{what}: {str(name_or_path)!r} does not exist (expected a folder{holding}, or a Hub repo id org/name)."
        )
    from huggingface_hub import snapshot_download

    repo_id, sub = match["repo"], match["sub"].strip("/")
    wanted = [f"{sub}/{p}" if sub else p for p in patterns] or ([f"{sub}/*"] if sub else None)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    except OSError as error:  # huggingface_hub's not-found / offline / HTTP errors are all OSErrors
        at = f" at revision {revision!r}" if revision else ""
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"{what}: {str(name_or_path)!r} does not exist locally, and Hub repo {repo_id!r}{at} could not be "
            f"downloaded ({first})."
        ) from error
    return folder / sub if sub else folder
