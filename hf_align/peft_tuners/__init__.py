"""PEFT tuners (Aligner), registered with ``peft`` as soon as ``peft`` is imported.

``import hf_align`` stays cheap: importing PEFT costs seconds, so the registration runs when the
program imports ``peft`` itself (or touches ``AlignerConfig``/``AlignerModel``). After that,
``peft.get_peft_model(model, AlignerConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` of a
saved Aligner adapter work with nothing else imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from hf_align._lazy import lazy_getattr


_EXPORTS = {
    "AlignerConfig": "aligner",
    "AlignerModel": "aligner",
    "AlignerAttention": "aligner",
    "SUPPORTED_MODEL_TYPES": "aligner",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__():
    return __all__


def register_with_peft() -> None:
    """Import (and thereby register) every hf-align PEFT tuner; idempotent."""
    importlib.import_module("hf_align.peft_tuners.aligner")


class _RegisterAfterPeftLoads(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """One-shot import hook: when ``peft`` itself is imported, register our tuners right after it loads."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register_with_peft()
        except Exception as error:  # never break `import peft` because of us
            warnings.warn(f"hf-align could not register its PEFT tuners: {error!r}", stacklevel=2)


def _install() -> None:
    if "peft" in sys.modules:
        register_with_peft()
    elif not any(isinstance(finder, _RegisterAfterPeftLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeftLoads())


_install()
