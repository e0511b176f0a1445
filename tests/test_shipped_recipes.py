"""Recipes ship with the package and are found by name (``--config allo/improve_dpo``); a path that exists wins."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from hf_align.cli import main
from hf_align.scripts.recipes import RECIPES_DIR, find_recipe


ROOT = Path(__file__).resolve().parents[1]
IN_CLONE = sorted(
    p.relative_to(ROOT / "recipes").with_suffix("").as_posix() for p in (ROOT / "recipes").rglob("*.yaml")
)


def test_the_clone_s_recipes_folder_is_the_package_s():
    """README's `--config recipes/...` paths and the package data are the same files."""
    assert (ROOT / "recipes").resolve() == RECIPES_DIR and len(IN_CLONE) >= 16


@pytest.mark.parametrize("spelling", ["allo/improve_dpo", "allo/improve_dpo.yaml", "recipes/allo/improve_dpo.yaml"])
def test_a_name_resolves_to_the_shipped_recipe(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here: the name is looked up among the shipped recipes
    assert find_recipe(spelling) == RECIPES_DIR / "allo" / "improve_dpo.yaml"


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "allo" / "improve_dpo.yaml"
    own.parent.mkdir()
    own.write_text("neuron_mask_ratio: 0.5\n")
    assert find_recipe("allo/improve_dpo.yaml") == Path("allo/improve_dpo.yaml")
    # through a command: the user's file sets the ratio (the shipped one is a masked-dpo recipe select-mask refuses)
    assert main(["select-mask", "--config", "allo/improve_dpo.yaml", "--help"]) == 0
    ratio_help = capsys.readouterr().out.split("\n  --neuron_mask_ratio", 1)[1].split("\n  --", 1)[0]
    assert " ".join(ratio_help.split()).endswith("(default: 0.5)")


def test_an_unknown_name_is_one_line_with_close_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["masked-dpo", "--config", "allo/improve_dop"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "allo/improve_dop" in err and "allo/improve_dpo" in err


def test_a_pipeline_by_name_finds_its_stage_recipes(tmp_path, monkeypatch):
    from hf_align.cli.pipeline import parse, stage_commands
    from hf_align.scripts.pipeline import load_pipeline

    monkeypatch.chdir(tmp_path)
    args = parse(["--config", "allo/pipeline_testbed"])
    recipe = load_pipeline(Path(args.recipe), stage_commands().names)
    stages = [s for s in recipe["stages"] if s.get("recipe")]
    assert stages and all((Path(args.recipe).parent / s["recipe"]).is_file() for s in stages)


def test_hf_align_recipes_lists_every_shipped_recipe_with_its_command(capsys):
    assert main(["recipes"]) == 0
    rows = [line.split(maxsplit=2) for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows] == IN_CLONE
    for name, command, description in rows:
        first = (ROOT / "recipes" / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# command: hf-align {command}" and description
        yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())


def test_the_wheel_contains_every_recipe(tmp_path):
    """Builds the wheel from a copy of this checkout (the installed setuptools, no network, nothing written here)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "hf_align", source / "hf_align", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("hf_align-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"hf_align/recipes/{name}.yaml" for name in IN_CLONE} <= names
