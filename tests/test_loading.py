"""One model loader (``hf_align.loading``): every model / tokenizer load outside the CLI goes through it, and it runs
no code from a model folder unless the caller asks (``trust_remote_code`` False by default)."""

import ast
from pathlib import Path

import pytest
import torch

import hf_align
from hf_align.loading import load_model, load_tokenizer


class _Recorder:
    calls: list = []

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls.calls.append((args, kwargs))
        return "model"


def test_trust_remote_code_is_false_unless_passed_and_dtype_names_are_checked():
    _Recorder.calls = []
    load_model("some/model", architecture=_Recorder)
    load_model(Path("folder"), architecture=_Recorder, dtype="bfloat16", revision="v1", trust_remote_code=True)
    (args, plain), (args2, asked) = _Recorder.calls
    assert args == ("some/model",) and plain == {"trust_remote_code": False}
    assert args2 == ("folder",) and asked == {"trust_remote_code": True, "dtype": torch.bfloat16, "revision": "v1"}
    with pytest.raises(ValueError, match=r"^dtype must be one of \('auto', 'float32', 'bfloat16', 'float16'\)"):
        load_model("x", architecture=_Recorder, dtype="int8")


def test_the_testbed_loads_through_it():
    from hf_align.testbed import MODEL_DIR

    model = load_model(MODEL_DIR, dtype="float32")
    tokenizer = load_tokenizer(MODEL_DIR)
    assert model.dtype == torch.float32 and tokenizer(["a b"])["input_ids"]


def test_no_model_is_loaded_elsewhere_outside_the_cli():
    """``X.from_pretrained(...)`` is called only in hf_align/loading.py (the CLI and its scripts are switched by their own branch;
    ``architectures`` reads a config, not a model)."""
    root = Path(hf_align.__file__).parent
    allowed = {"loading.py", "architectures.py"}
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("cli", "scripts") or str(relative) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []


def test_one_dtype_rule_for_loading_merging_and_conversion(tmp_path):
    from hf_align.loading import convert_gguf, parse_dtype
    from hf_align.merging import streaming

    assert streaming.parse_dtype is parse_dtype
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("Float16") is torch.float16
    assert parse_dtype("auto") is None and parse_dtype(None) is None and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match=r"^dtype must be one of \('bfloat16', 'float16', 'float32'\), got 'float64'"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", dtype="float64")  # before the file is read
    with pytest.raises(ValueError, match=r"^dtype must be one of .*'float64'\), got 'int8'"):
        parse_dtype("int8")
