"""Every ```python snippet in README.md and docs/*.md runs (offline, CPU), so the docs cannot rot.

A block fenced as ```python skip is shown but not run (GPU-only or network snippets); say why in the text.
"""

import os
import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```\s*$", re.S | re.M)


def _snippets():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in files:
        if not path.exists():
            continue
        text = path.read_text()
        for match in FENCE.finditer(text):
            info = match.group("info").strip().split()
            if info[:1] != ["python"] or "skip" in info[1:]:
                continue
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group("code"), id=f"{path.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize("code", list(_snippets()))
def test_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(code, "<snippet>", "exec"), namespace)  # noqa: S102 - our own documentation


def test_docs_have_snippets():
    assert len(list(_snippets())) >= 1
    assert os.path.exists(ROOT / "README.md")
