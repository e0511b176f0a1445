"""Every command's outputs: apart from its inputs, and locked while it runs (issue 28).

:class:`hf_align.cli.common.CommandParser` calls :func:`guard_outputs` on what it parsed, so every command, and
every command added later, gets both rules from the field names below; the dispatcher
(:func:`hf_align.cli.run_command`) opens the :func:`command_scope` the locks live in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any


OUTPUT_FIELDS = ("output_dir", "output_file", "merged_output_dir")
"""The fields that name what a command writes (each is locked while it runs, and kept apart from every input)."""
INPUT_FIELDS = (
    "model_name_or_path", "base_model_name_or_path", "reference_model", "adapter", "init", "trained", "scorer",
    "scorer_tokenizer", "chat_template_path", "dataset_name", "retain_dataset_name", "datasets", "neuron_mask_path",
    "reward", "reward_funcs",
)  # fmt: skip
"""The fields that name a model, reference, adapter, dataset, mask or reward model a command reads (a local path
counts; a Hub id or ``module:function`` does not). Saved scores are not protected: ``select-mask`` may write its
mask beside them."""
_SCOPES: list[contextlib.ExitStack] = []


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Where a command's output locks live: taken while its arguments are parsed (:func:`guard_outputs`), released
    when the command returns. The dispatcher opens one per command (a pipeline's stages get theirs); outside one (a
    process ``accelerate launch`` started, whose parent holds the lock) nothing is locked."""
    with contextlib.ExitStack() as stack:
        _SCOPES.append(stack)
        try:
            yield
        finally:
            _SCOPES.pop()


def io_paths(parsed: Iterable[Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``({--field: output}, {--field: input})`` of the parsed dataclasses (:data:`OUTPUT_FIELDS`,
    :data:`INPUT_FIELDS`; a list field's items as ``--field[i]``, a ``datasets`` mixture entry's ``path``)."""
    outputs: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for args in parsed:
        if not dataclasses.is_dataclass(args):
            continue
        for field in dataclasses.fields(args):
            value = getattr(args, field.name, None)
            if field.name in OUTPUT_FIELDS and isinstance(value, str | os.PathLike):
                outputs[f"--{field.name}"] = os.fspath(value)
            elif field.name in INPUT_FIELDS:
                items = value if isinstance(value, list | tuple) else [value]
                for index, item in enumerate(items):
                    item = getattr(item, "path", None) or (item.get("path") if isinstance(item, dict) else item)
                    if isinstance(item, str | os.PathLike) and os.fspath(item) != "testbed":  # the package's own
                        label = f"--{field.name}" + (f"[{index}]" if isinstance(value, list | tuple) else "")
                        inputs[label] = os.fspath(item)
    return outputs, inputs


def guard_outputs(parsed: Iterable[Any], command: str, outputs: dict | None = None, inputs: dict | None = None):
    """Before anything loads: no output is, contains or lies inside an input (:func:`hf_align.io.refuse_overlap`),
    then each output is locked for this command (:func:`hf_align.io.output_lock`) inside the current
    :func:`command_scope`. ``outputs``/``inputs``: more ``{label: path}`` beyond the parsed fields'."""
    from hf_align.io import output_lock, refuse_overlap

    found_outputs, found_inputs = io_paths(parsed)
    found_outputs.update(outputs or {})
    found_inputs.update(inputs or {})
    refuse_overlap(found_outputs, found_inputs)
    if not _SCOPES:
        return
    for output in found_outputs.values():
        _SCOPES[-1].enter_context(output_lock(output, f"hf-align {command}"))
