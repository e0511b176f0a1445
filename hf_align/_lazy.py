"""Lazy attribute loading, so ``import hf_align`` stays cheap and optional parts fail only when used."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_getattr(package: str, mapping: dict[str, str], moved: dict[str, str] | None = None):
    """Build a module ``__getattr__`` that imports ``package.<mapping[name]>`` on first access; a name in ``moved``
    (``{"Old": "new.home.Old"}``) raises an ``AttributeError`` that says where it lives now."""

    def __getattr__(name: str) -> Any:
        if moved and name in moved:
            raise AttributeError(f"{package}.{name} moved: import it from {moved[name].rsplit('.', 1)[0]!r} instead.")
        if name not in mapping:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{mapping[name]}")
        return getattr(module, name)

    return __getattr__
