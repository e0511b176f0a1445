"""Finite or refused: every tensor hf-align reads back (deltas, scores, α's, merge inputs, checkpoints scored) and
every merge output is checked for NaN/±inf as it is read or computed; the refusal names the file and the tensor."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_align.errors import UserError
from hf_align.io import check_finite, is_finite, load_tensors


BAD = [float("nan"), float("inf"), float("-inf")]
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _poison(tensor, value, index=3):
    tensor = tensor.clone()
    tensor.view(-1)[index] = value
    return tensor


@pytest.mark.parametrize("dtype", FLOATS + [torch.float8_e4m3fn])
@pytest.mark.parametrize("value", BAD + [1.0])
def test_is_finite_matches_isfinite_for_every_float_dtype(dtype, value):
    tensor = _poison(torch.ones(4, 5), value).to(dtype)
    assert is_finite(tensor) == bool(torch.isfinite(tensor.to(torch.float64)).all())


def test_is_finite_is_not_fooled_by_large_finite_values_or_cancelling_infs():
    big = torch.full((1000,), torch.finfo(torch.float32).max)
    assert is_finite(big) and is_finite(big.to(torch.float64) * 0.5)
    assert not is_finite(torch.tensor([float("inf"), float("-inf")]))
    assert is_finite(torch.tensor([1, 2], dtype=torch.int64)) and is_finite(torch.empty(0))


def test_check_finite_names_source_tensor_and_counts():
    with pytest.raises(UserError, match=r"'f.safetensors': tensor 'w' holds 1 NaN and 2 ±inf of 20 values"):
        check_finite(_poison(_poison(_poison(torch.ones(4, 5), math.nan, 0), math.inf, 1), -math.inf, 2), "w",
                     "f.safetensors")  # fmt: skip


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("dtype", FLOATS)
def test_load_tensors_refuses_non_finite(tmp_path, value, dtype):
    path = tmp_path / "t.safetensors"
    save_file({"ok": torch.ones(3, dtype=dtype), "bad.weight": _poison(torch.ones(8), value).to(dtype)}, path)
    with pytest.raises(UserError, match=rf"{path}.*tensor 'bad.weight'"):
        load_tensors(path)


# ------------------------------------------------------------------------------------ every reader built on it


@pytest.fixture
def model_with_deltas():
    from hf_align.masks import NeuronMask
    from hf_align.sparse_update import attach_deltas
    from hf_align.testbed import load_random_tiny

    model = load_random_tiny("llama", hidden_size=32, num_layers=2)
    mask = NeuronMask.random(model, 0.25, "row", seed=0)
    return attach_deltas(model, mask), mask


@pytest.mark.parametrize("value", BAD)
def test_load_deltas_refuses_non_finite_deltas_before_attaching(tmp_path, model_with_deltas, value):
    from hf_align.sparse_update import DELTAS_FILE, has_deltas, load_deltas, save_deltas
    from hf_align.testbed import load_random_tiny

    model, mask = model_with_deltas
    save_deltas(model, tmp_path, mask)
    tensors = load_file(tmp_path / DELTAS_FILE)
    name = sorted(tensors)[1]
    tensors[name] = _poison(tensors[name], value)
    save_file(tensors, tmp_path / DELTAS_FILE, metadata={"format": "hf-align-neuron-deltas"})
    fresh = load_random_tiny("llama", hidden_size=32, num_layers=2)
    with pytest.raises(UserError, match=rf"{DELTAS_FILE}'.*tensor '{name}'"):
        load_deltas(fresh, tmp_path)
    assert not has_deltas(fresh)


@pytest.mark.parametrize("value", BAD)
def test_load_scores_refuses_non_finite_scores(tmp_path, value):
    from hf_align.scores import SCORES_FILE, load_scores, save_scores

    scores = {"a.weight": torch.rand(6), "b.weight": torch.rand(4)}
    save_scores(tmp_path, scores, meta={"method": "test"})
    tensors = load_file(tmp_path / SCORES_FILE)
    from hf_align.io import safetensors_metadata

    metadata = safetensors_metadata(tmp_path / SCORES_FILE)
    save_file({**tensors, "b.weight": _poison(tensors["b.weight"], value, 1)}, tmp_path / SCORES_FILE, metadata)
    with pytest.raises(UserError, match=rf"{SCORES_FILE}'.*tensor 'b.weight'"):
        load_scores(tmp_path)


@pytest.mark.parametrize("value", BAD)
def test_learned_alphas_refuse_non_finite(tmp_path, value):
    from hf_align.merging.adaptive import ALPHAS_TENSORS, LearnedAlphas

    LearnedAlphas(0.2, 0.2, "block2", 4, [0.1, 0.2], 0.3, {"lm_head": None}).save(tmp_path)
    save_file({"blocks": torch.tensor([0.1, value]), "head": torch.tensor([0.3])}, tmp_path / ALPHAS_TENSORS)
    with pytest.raises(UserError, match="tensor 'blocks'"):
        LearnedAlphas.load(tmp_path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from hf_align.testbed import load_random_tiny

    root = tmp_path_factory.mktemp("finite")
    for seed, name in ((0, "base"), (1, "aligned")):
        load_random_tiny("llama", hidden_size=32, num_layers=2, seed=seed).save_pretrained(root / name)
    return root / "base", root / "aligned"


def _poisoned_copy(source, target, value, tensor="model.layers.1.mlp.up_proj.weight"):
    import shutil

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors[tensor] = _poison(tensors[tensor], value)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("side", ["base", "aligned"])
@pytest.mark.parametrize("value", BAD)
def test_merge_refuses_non_finite_inputs_and_writes_nothing(pair, tmp_path, side, value):
    from hf_align.merging import merge_models

    base, aligned = pair
    poisoned = _poisoned_copy(base if side == "base" else aligned, tmp_path / side, value)
    inputs = (poisoned, aligned) if side == "base" else (base, poisoned)
    with pytest.raises(UserError, match=rf"{poisoned / 'model.safetensors'}'.*'model.layers.1.mlp.up_proj.weight'"):
        merge_models(*inputs, tmp_path / "out", alpha=0.5, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_merge_refuses_an_output_dtype_that_overflows(pair, tmp_path, alpha):
    """Finite fp32 inputs whose average does not fit float16: refused, not written as inf."""
    import shutil

    from hf_align.merging import merge_models

    base, aligned = pair
    for source, name in ((base, "b"), (aligned, "a")):
        shutil.copytree(source, tmp_path / name)
        tensors = load_file(tmp_path / name / "model.safetensors")
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 0 + 1e6
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"'model.norm.weight'.*not finite in torch.float16"):
        merge_models(tmp_path / "b", tmp_path / "a", tmp_path / "out", alpha=alpha, dtype="float16", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("side", ["init", "trained"])
def test_weight_diff_scores_refuse_non_finite_checkpoints(pair, tmp_path, side):
    from hf_align.scores import weight_diff_scores

    base, aligned = pair
    poisoned = _poisoned_copy(base if side == "init" else aligned, tmp_path / side, math.nan)
    init, trained = (poisoned, aligned) if side == "init" else (base, poisoned)
    with pytest.raises(UserError, match=rf"{poisoned / 'model.safetensors'}'.*'model.layers.1.mlp.up_proj.weight'"):
        weight_diff_scores(init, trained, granularity="row")


# ------------------------------------------------------------------------------------ resume


def test_resuming_a_checkpoint_with_nan_deltas_is_refused(tmp_path):
    """Before: the resumed run trained on with loss 0.0 and grad_norm nan."""
    from hf_align import testbed
    from hf_align.masks import NeuronMask
    from hf_align.trainers import NPOConfig, NPOTrainer

    tok = testbed.load_tokenizer()
    forget = testbed.forget_dataset(4, seed=0)
    mask = NeuronMask.random(testbed.load_random_tiny("llama", hidden_size=32, num_layers=2), 0.25, "row", seed=3)

    def trainer(max_steps):
        args = NPOConfig(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=max_steps, save_steps=1,
            save_strategy="steps", report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0,
            disable_tqdm=True, logging_steps=1,
        )  # fmt: skip
        model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
        return NPOTrainer(model, args=args, train_dataset=forget, processing_class=tok, neuron_mask=mask)

    trainer(1).train()
    (deltas,) = (tmp_path / "out" / "checkpoint-1").rglob("neuron_deltas.safetensors")
    tensors = load_file(deltas)
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] * math.nan}, deltas, metadata={"format": "hf-align-neuron-deltas"})
    with pytest.raises(UserError, match=rf"{deltas}'.*tensor '{name}'"):
        trainer(2).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
