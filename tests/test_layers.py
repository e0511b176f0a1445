"""The package's layer rules, read from the source (imports inside functions count), so they stay true.

cli → scripts (pipeline engine, training script) → trainers / callbacks / tuners → core → libraries; the testbed is a demo that only the CLI and its scripts may use; every
``transformers.Trainer`` subclass lives in ``hf_align/trainers/``; no import circle between hf_align's files.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import transformers

import hf_align


ROOT = Path(hf_align.__file__).parent
UPPER = ("hf_align.trainers", "hf_align.callbacks", "hf_align.scripts", "hf_align.cli", "hf_align.testbed")
LINE_BUDGETS = {"trainers/masked_dpo.py": 400, "trainers/npo.py": 520, "trainers/feedback_conditioned.py": 700}


def _module_name(path: Path) -> str:
    name = ".".join(("hf_align", *path.relative_to(ROOT).with_suffix("").parts))
    return name.removesuffix(".__init__")


FILES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _lazy_exports(module: str) -> dict[str, str]:
    """A package's ``_EXPORTS = {"Name": "submodule"}`` (what ``hf_align._lazy`` imports on first access)."""
    path = FILES.get(module)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            exports = ast.literal_eval(node.value)
            return {name: f"{module}.{sub}" for name, sub in exports.items()}
    return {}


def _owner(name: str) -> str | None:
    """The hf_align module a dotted name lives in (its deepest existing prefix)."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The hf_align modules ``module`` imports anywhere in its file (``from pkg import sub`` counts as ``pkg.sub``)."""
    path = FILES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            lazy = _lazy_exports(base)
            targets = [lazy.get(alias.name, f"{base}.{alias.name}") for alias in node.names]
        else:
            continue
        found.update(owner for owner in map(_owner, targets) if owner and owner != module)
    return found


GRAPH = {module: _imports(module) for module in FILES}


def _is_core(module: str) -> bool:
    return module != "hf_align" and not module.startswith(UPPER)


def test_core_imports_no_layer_above_and_no_testbed():
    bad = sorted(f"{m} -> {t}" for m in GRAPH if _is_core(m) for t in GRAPH[m] if t.startswith(UPPER))
    assert bad == []


def test_trainers_callbacks_and_scripts_never_import_the_cli():
    bad = sorted(
        f"{m} -> {t}"
        for m in GRAPH
        if m.startswith(("hf_align.trainers", "hf_align.callbacks", "hf_align.scripts"))
        for t in GRAPH[m]
        if t.startswith("hf_align.cli")
    )
    assert bad == []


def test_only_the_cli_and_its_scripts_import_the_testbed():
    bad = sorted(
        f"{m} -> {t}"
        for m in GRAPH
        if not m.startswith(("hf_align.testbed", "hf_align.cli", "hf_align.scripts"))
        for t in GRAPH[m]
        if t.startswith("hf_align.testbed")
    )
    assert bad == []


def _cycle() -> list[str] | None:
    """One import circle between hf_align's files, or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if state.get(target) is None and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module != "hf_align" and state.get(module) is None and (found := visit(module)):
            return found
    return None


def test_no_import_circle():
    assert _cycle() is None


def test_the_cycle_finder_finds_a_planted_circle(monkeypatch):
    """Control: the rule above can fail."""
    monkeypatch.setitem(GRAPH, "hf_align.masks", GRAPH["hf_align.masks"] | {"hf_align.trainers.masked_dpo"})
    found = _cycle()
    assert found is not None and found[0] == found[-1]


def test_every_trainer_subclass_lives_in_trainers():
    outside = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="hf_align."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, transformers.Trainer):
                if not info.name.startswith("hf_align.trainers."):
                    outside.append(f"{info.name}.{cls.__name__}")
    assert outside == []


@pytest.mark.parametrize("relative, budget", sorted(LINE_BUDGETS.items()))
def test_line_budgets(relative, budget):
    lines = len((ROOT / relative).read_text().splitlines())
    assert lines <= budget, f"{relative} has {lines} lines (budget {budget})"


def test_the_command_line_only_parses_and_dispatches():
    """What a command runs lives in hf_align/scripts (as trl/scripts); this budget keeps it there."""
    lines = sum(len(path.read_text().splitlines()) for path in (ROOT / "cli").glob("*.py"))
    assert lines <= 1300, f"hf_align/cli/ has {lines} lines (budget 1300): move what is not parsing into scripts/"


def test_a_moved_name_says_where_it_lives_now():
    import hf_align.merging

    with pytest.raises(AttributeError, match=r"AdaptiveMergeTrainer moved: import it from 'hf_align.trainers'"):
        hf_align.merging.AdaptiveMergeTrainer  # noqa: B018
    from hf_align.trainers import AdaptiveMergeTrainer  # noqa: F401
