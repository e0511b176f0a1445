"""We never unpickle what a user could hand us: scan the package for unsafe loads."""

import ast
from pathlib import Path

import pytest

from hf_align.testbed import quiet_training_args
from hf_align.trainers.registry import TRAINERS


PACKAGE = Path(__file__).resolve().parents[1] / "hf_align"
PICKLE_MODULES = {"pickle", "cPickle", "dill", "joblib", "shelve"}


def _dotted(func) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value for kw in call.keywords
    )


def scan(source: str, filename: str = "<string>") -> list[str]:
    """Unsafe deserialisation in ``source``: pickle imports, torch.load without weights_only=True, ..."""
    problems = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            if any(name.split(".")[0] in PICKLE_MODULES for name in names):
                problems.append(f"{filename}:{node.lineno}: imports a pickle-based module")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
                problems.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and _keyword_is(node, "allow_pickle", True):
                problems.append(f"{filename}:{node.lineno}: numpy.load(allow_pickle=True)")
            if name.endswith("read_pickle"):
                problems.append(f"{filename}:{node.lineno}: read_pickle")
    return problems


def test_no_unsafe_loads_in_package():
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in scan(path.read_text(), str(path))]
    assert not problems, "\n".join(problems)


def test_scanner_catches_unsafe_loads():
    """The scan must be able to fail: known-bad snippets are flagged, safe ones are not."""
    assert scan("import torch\nstate = torch.load('x.bin')\n")
    assert scan("import torch\nstate = torch.load('x.bin', weights_only=False)\n")
    assert scan("import pickle\n")
    assert scan("from joblib import load\n")
    assert scan("import numpy as np\nnp.load('x.npy', allow_pickle=True)\n")
    assert not scan("import torch\nstate = torch.load('x.bin', weights_only=True)\n")
    assert not scan("from safetensors.torch import load_file\nload_file('x.safetensors')\n")


def test_checkpoints_hold_no_full_pickle(tmp_path):
    """transformers pickles TrainingArguments into training_args.bin; our trainers write JSON instead, and every
    other .pt/.pth a checkpoint holds (optimizer, scheduler, RNG) loads with weights_only=True."""
    import json

    import torch
    from transformers.trainer_pt_utils import safe_globals

    from hf_align import testbed
    from hf_align.masks import NeuronMask
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    tb = testbed.load()
    args = MaskedDPOConfig(**quiet_training_args(
        output_dir=str(tmp_path), max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=2,
        gradient_checkpointing=False,
    ))  # fmt: skip
    trainer = MaskedDPOTrainer(
        model=tb.model, args=args, train_dataset=tb.preference_dataset(4), processing_class=tb.tokenizer,
        neuron_mask=NeuronMask.random(tb.model, 0.1, "row", seed=0),
    )  # fmt: skip
    trainer.train()
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        assert not (checkpoint / "training_args.bin").exists()
        assert json.loads((checkpoint / "training_args.json").read_text())["max_steps"] == 2
        for path in [*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]:
            with safe_globals():  # the numpy RNG state: the allowlist transformers itself resumes with
                torch.load(path, weights_only=True)


_MASKED = [spec for spec in TRAINERS.values() if spec.masked]  # hf-align's trainers on TRL's (preference data)


@pytest.mark.parametrize("spec", _MASKED, ids=[spec.name for spec in _MASKED])
def test_python_api_save_model_without_deltas_writes_json_not_pickle(tmp_path, spec):
    """``save_model()`` called by a user (no mask, so transformers' own ``_save`` writes the weights) leaves
    training_args.json and no training_args.bin, for each hf-align trainer built on TRL's."""
    import json

    from hf_align import testbed

    tb = testbed.load()
    common = quiet_training_args(
        max_steps=1, per_device_train_batch_size=2,
        gradient_checkpointing=False,
    )  # fmt: skip
    trainer = spec.trainer_class()(
        model=testbed.load().model, args=spec.config_class()(output_dir=str(tmp_path / spec.name), **common),
        train_dataset=tb.preference_dataset(4), processing_class=tb.tokenizer,
    )  # fmt: skip
    target = tmp_path / f"{trainer.args.output_dir}-saved"
    trainer.save_model(str(target))
    assert (target / "model.safetensors").exists()
    assert not (target / "training_args.bin").exists()
    assert json.loads((target / "training_args.json").read_text())["max_steps"] == 1
