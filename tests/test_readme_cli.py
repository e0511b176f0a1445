"""Every `hf-align` line in README.md's ```bash blocks runs as written (offline, CPU, small), in order.

A line that cannot run here says so in a trailing comment (`# needs ... GPU ...` / `# needs ... Hub ...`) and is
only parsed. Lines run in-process, in a scratch folder that sees the repository's `recipes/`, so what one line
writes (the testbed pipeline's masks) the next can read, as on a fresh clone.
"""

import re
import shlex
from pathlib import Path

import pytest

from hf_align.cli import COMMANDS, all_commands, main


ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```bash\n(?P<code>.*?)^```\s*$", re.S | re.M)
NEEDS = re.compile(r"#.*\bneeds\b.*\b(GPUs?|Hub)\b")
COVERED = {"hf-align quickstart": ROOT / "tests" / "test_quickstart.py"}
"""Lines another test already runs in full (the quickstart's defaults, a few minutes): not run twice."""


def readme_lines() -> list[tuple[str, bool]]:
    """(command line, runnable here) for each `hf-align` line of the README's bash blocks."""
    lines = []
    for block in FENCE.finditer((ROOT / "README.md").read_text()):
        for line in block.group("code").splitlines():
            if line.strip().startswith("hf-align "):
                lines.append((line.strip(), not NEEDS.search(line)))
    return lines


def test_readme_has_hf_align_lines_and_every_skip_says_why():
    lines = readme_lines()
    assert sum(runnable for _, runnable in lines) >= 3
    for line, _ in lines:
        command = shlex.split(line, comments=True)[1]
        assert command in all_commands() or command in ("--help", "-h"), line


def test_readme_hf_align_lines_run_as_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for line, runnable in readme_lines():
        if not runnable or line in COVERED:
            assert line not in COVERED or COVERED[line].exists(), line
            continue
        argv = shlex.split(line, comments=True)[1:]
        code = main(argv)
        assert code == 0, f"{line}\n{capsys.readouterr().err[-2000:]}"


@pytest.mark.parametrize("line", [line for line, runnable in readme_lines() if not runnable])
def test_readme_lines_that_need_gpus_or_the_hub_still_parse(line, tmp_path, monkeypatch):
    """Their recipes and flags exist (a typo would otherwise hide behind the comment)."""
    monkeypatch.chdir(ROOT)
    argv = shlex.split(line, comments=True)[1:]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from hf_align.cli.training import parse

        parse(name, [*rest, "--bf16", "false", "--use_cpu", "true"])
    elif name == "pipeline":
        from hf_align.cli.pipeline import parse, stage_commands
        from hf_align.scripts.pipeline import load_pipeline

        load_pipeline(Path(parse(rest).recipe), stage_commands().names)
