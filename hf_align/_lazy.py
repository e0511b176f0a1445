"""Lazy attribute loading, so ``import hf_align`` stays cheap and optional parts fail only when used."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_getattr(package: str, mapping: dict[str, str]):
    """Build a module ``__getattr__`` that imports ``package.<mapping[name]>`` on first access."""

    def __getattr__(name: str) -> Any:
        if name not in mapping:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{mapping[name]}")
        return getattr(module, name)

    return __getattr__
