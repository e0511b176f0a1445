"""A local stand-in for the Hugging Face Hub: uploads land in a real ``huggingface_hub`` cache tree, so the real
download API (``snapshot_download``, ``hf_hub_download``, ``from_pretrained``) reads them back offline.

``HfApi.create_repo`` / ``HfApi.upload_folder`` are patched on the class (every ``HfApi`` instance, transformers'
shared ``hf_api()`` included) to write ``models--org--name/snapshots/<commit>/`` and ``refs/<revision>``; a commit
holds the files of the revision's previous commit plus the uploaded ones, as a Hub commit does. A fresh process
reads the same tree with ``HF_HUB_CACHE=<root>`` and ``HF_HUB_OFFLINE=1`` (:meth:`LocalHub.env`): nothing reaches the
network, and what it loads is only what was "uploaded".
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


class LocalHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repos: list[tuple[str, bool | None]] = []
        self.uploads: list[tuple[str, str, set[str]]] = []  # (repo id, commit, files of that upload)

    # ---- the API surface hf-align, transformers and TRL call --------------------------------------------
    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **_):
        from huggingface_hub import RepoUrl

        assert repo_type in (None, "model"), repo_type
        self.repos.append((repo_id, private))
        (self._repo(repo_id) / "refs").mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, revision=None,
                      allow_patterns=None, ignore_patterns=None, run_as_future=False, **_):  # fmt: skip
        from huggingface_hub import CommitInfo
        from huggingface_hub.utils import filter_repo_objects

        assert (self._repo(repo_id) / "refs").is_dir(), f"upload to {repo_id!r} before create_repo"
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        files = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        revision = revision or "main"
        commit = hashlib.sha1(f"{repo_id}:{len(self.uploads)}:{commit_message}".encode()).hexdigest()
        target = self._repo(repo_id) / "snapshots" / commit
        previous = self.commit(repo_id, revision)
        if previous is not None:
            shutil.copytree(self._repo(repo_id) / "snapshots" / previous, target)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        for name in files:
            (target / prefix / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target / prefix / name)
        target.mkdir(parents=True, exist_ok=True)
        (self._repo(repo_id) / "refs" / revision).write_text(commit)
        self.uploads.append((repo_id, commit, {prefix + name for name in files}))
        info = CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}", commit_message=commit_message or "",
            commit_description="", oid=commit,
        )  # fmt: skip
        if run_as_future:
            from concurrent.futures import Future

            future = Future()
            future.set_result(info)
            return future
        return info

    # ---- reading what was uploaded ----------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}"

    def commit(self, repo_id: str, revision: str = "main") -> str | None:
        ref = self._repo(repo_id) / "refs" / revision
        return ref.read_text().strip() if ref.is_file() else None

    def folder(self, repo_id: str, revision: str = "main") -> Path:
        return self._repo(repo_id) / "snapshots" / self.commit(repo_id, revision)

    def files(self, repo_id: str, revision: str = "main") -> set[str]:
        folder = self.folder(repo_id, revision)
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}

    def env(self) -> dict[str, str]:
        """The environment of a fresh process that sees this hub (and no network)."""
        return {**os.environ, "HF_HUB_CACHE": str(self.root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def install(self, monkeypatch) -> LocalHub:
        """Route this process's ``HfApi`` uploads and ``huggingface_hub`` downloads to this hub."""
        from huggingface_hub import HfApi, constants

        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.create_repo(repo_id, **kw))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: self.upload_folder(**kw))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.root))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        for name, value in self.env().items():
            if name.startswith(("HF_", "TRANSFORMERS_")):
                monkeypatch.setenv(name, value)
        return self
