"""Every private library name hf-align relies on (``hf_align._compat.SEAMS``) still exists, with the parameters we
call or override it with, in the installed TRL / PEFT / transformers / accelerate; and none of our classes overrides
a private library method that the table does not list."""

import enum
import importlib
import inspect
import pkgutil
from types import SimpleNamespace

import pytest

import hf_align
from hf_align import _compat


def _resolve(owner: str):
    module_name, _, qualname = owner.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:  # an optional extra (DeepSpeed) that is not installed
        pytest.skip(f"{module_name} is not installed: {error}")
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("seam", _compat.SEAMS, ids=lambda s: f"{s.owner}.{s.name}")
def test_private_name_still_exists(seam):
    owner = _resolve(seam.owner)
    if seam.kind == "instance":
        assert f".{seam.name}" in inspect.getsource(owner), f"{seam.owner} no longer uses .{seam.name}"
        return
    assert hasattr(owner, seam.name), f"{seam.owner} has no {seam.name} any more (used by {seam.where})"
    value = getattr(owner, seam.name)
    if seam.kind == "base":
        assert inspect.isclass(value)
    elif seam.kind in ("override", "call"):
        params = tuple(inspect.signature(value).parameters)
        assert params[: len(seam.params)] == seam.params, f"{seam.owner}.{seam.name}{params}: we rely on {seam.params}"
    else:
        assert seam.kind == "attribute", seam.kind


def _our_classes():
    for info in pkgutil.walk_packages(hf_align.__path__, "hf_align."):
        if info.name.endswith("__main__"):  # running it is running the command line
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra
            continue
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__ == module.__name__:
                yield value


def test_every_private_override_is_listed():
    """Mixins count too: ``NeuronMaskTrainerMixin._save`` overrides ``Trainer._save`` once mixed into a trainer."""
    listed = [(_resolve(s.owner), s.name) for s in _compat.SEAMS if s.kind in ("override", "attribute")]
    unlisted = set()
    for cls in _our_classes():
        ours = [k for k in cls.__mro__ if k.__module__.startswith("hf_align")]
        theirs = [k for k in cls.__mro__ if not k.__module__.startswith(("hf_align", "builtins", "torch", "enum"))]
        for name in {name for k in ours for name in vars(k)}:
            if not name.startswith("_") or name.startswith("__") or name == "_abc_impl":  # ABCMeta's own
                continue
            base = next((k for k in theirs if name in vars(k)), None)
            if base is not None and not any(
                issubclass(base, o) and name == n for o, n in listed if inspect.isclass(o)
            ):
                unlisted.add(f"{name} overrides {base.__module__}.{base.__qualname__} in {cls.__qualname__}")
    assert not unlisted, "add these to hf_align._compat.SEAMS:\n" + "\n".join(sorted(unlisted))


def test_add_enum_member():
    class Kind(str, enum.Enum):
        A = "A"

    member = _compat.add_enum_member(Kind, "B")
    assert Kind["B"] is member is Kind("B") and member.value == "B" and list(Kind) == [Kind.A, member]
    assert _compat.add_enum_member(Kind, "A") is Kind.A


def test_signature_columns_and_precompute_flag():
    trainer = SimpleNamespace(_signature_columns=["input_ids", "x"], precompute_ref_logps=False)
    _compat.add_signature_columns(trainer, ["x", "token_weights"])
    assert trainer._signature_columns == ["input_ids", "x", "token_weights"]
    with pytest.raises(RuntimeError), _compat.reference_logps_as_precomputed(trainer):
        assert trainer.precompute_ref_logps is True
        raise RuntimeError
    assert trainer.precompute_ref_logps is False
