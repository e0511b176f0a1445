"""Every benchmark result the README or the docs cite is in the checkout: results are gitignored by default
(`git add -f` or a `!` line in .gitignore), so a cited file can silently stay on the machine that made it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"benchmarks/results/[A-Za-z0-9_.-]+\.(?:json|md|png)")


def _cited() -> set[str]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {m for doc in docs for m in CITED.findall(doc.read_text(encoding="utf-8"))}


def _links_of(report: Path) -> set[str]:
    """Relative links and images of a results report (``fidelity.md`` links its plots beside it)."""
    text = report.read_text(encoding="utf-8")
    return {f"benchmarks/results/{m}" for m in re.findall(r"\]\(([A-Za-z0-9_.-]+\.(?:json|md|png))\)", text)}


def test_readme_cites_results():
    assert {"benchmarks/results/fidelity.md", "benchmarks/results/real_model_benchmark.json"} <= _cited()


@pytest.mark.parametrize("path", sorted(_cited() | _links_of(ROOT / "benchmarks/results/fidelity.md")))
def test_a_cited_result_is_tracked(path):
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True, text=True
    ).returncode == 0  # fmt: skip
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
    assert (ROOT / path).is_file() and (tracked or not ignored), f"{path} is cited but not committed (gitignored)"
