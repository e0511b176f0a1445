"""The recipes shipped in the package (``hf_align/recipes/<method>/<name>.yaml``), found by name.

``--config allo/improve_dpo`` (with or without ``.yaml``) names a shipped recipe, as TRL finds its accelerate
configs by name; a path that exists always wins, so ``--config recipes/allo/improve_dpo.yaml`` in a clone (where
``recipes/`` links to the package's folder) and a user's own file work as before.
"""

from __future__ import annotations

import difflib
from pathlib import Path


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """name (``allo/improve_dpo``) → file of every shipped recipe, sorted by name."""
    files = sorted(RECIPES_DIR.glob("*/*.yaml"))
    return {path.relative_to(RECIPES_DIR).with_suffix("").as_posix(): path for path in files}


def find_recipe(value: str) -> Path:
    """The recipe ``--config value`` means: an existing file, else the shipped recipe of that name; else one line
    naming the closest shipped names."""
    path = Path(value)
    if path.is_file():
        return path
    recipes = shipped_recipes()
    name = value.removesuffix(".yaml").removeprefix("recipes/")
    if name in recipes:
        return recipes[name]
    close = difflib.get_close_matches(name, recipes, n=3, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else "`hf-align recipes` lists them"
    raise FileNotFoundError(f"--config {value!r}: no such file and no shipped recipe of that name ({hint}).")


def describe(path: Path) -> tuple[str, str]:
    """(command, first description line) from a recipe's leading comments (``# command: hf-align X``, then text)."""
    command, description = "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("command:"):
            command = text.removeprefix("command:").strip().removeprefix("hf-align ").strip()
        elif text and not description:
            description = text
    return command, description
