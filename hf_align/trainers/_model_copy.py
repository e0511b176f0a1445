"""A deep copy of a model that runs *itself*.

TRL's ``add_fused_lm_head`` (every TRL trainer calls it on its model) replaces ``model.forward`` with a function
that closes over the model's previous bound ``forward``. ``copy.deepcopy`` copies the instance attribute but not
the closure, so the copy's forward still calls the *original* model: a "frozen reference" copied from a model a
TRL trainer has touched silently tracks the policy (KL stays 0). :func:`independent_copy` drops such overrides,
so the copy gets its class ``forward`` back; a trainer that wants the fused head adds it to the copy again.
"""

from __future__ import annotations

import copy
import types

import torch


def _refers_to(value, source: torch.nn.Module, depth: int = 3) -> bool:
    """Whether ``value`` (a function, a bound method or a closure cell's content) reaches ``source``."""
    if value is source:
        return True
    if depth == 0:
        return False
    if isinstance(value, types.MethodType):
        return value.__self__ is source or _refers_to(value.__func__, source, depth - 1)
    closure = getattr(value, "__closure__", None) or ()
    for cell in closure:
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if _refers_to(content, source, depth - 1):
            return True
    wrapped = getattr(value, "__wrapped__", None)
    return wrapped is not None and _refers_to(wrapped, source, depth - 1)


def independent_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)`` minus the instance-level ``forward`` overrides that still call the original."""
    clone = copy.deepcopy(model)
    for source, target in zip(model.modules(), clone.modules(), strict=True):
        patched = target.__dict__.get("forward")
        if patched is not None and _refers_to(patched, source):
            del target.__dict__["forward"]
    return clone


def reference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference of ``model`` as it is now: :func:`independent_copy`. Under DeepSpeed ZeRO-3 the parameters
    are partitioned at load (a copy would hold this process's empty shards), so the checkpoint the model came from
    (``config._name_or_path``) is loaded again, partitioned alike, as TRL builds its own reference."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return independent_copy(model)
    from trl.trainer.utils import get_config_model_id

    from hf_align.loading import load_model

    return load_model(get_config_model_id(model.config), dtype=model.dtype)
