"""The bad-input catalogue: each case gets a specific message and leaves nothing half-written.

Cases are grouped by where the input enters: files and outputs (hf_align.io), the CLI and recipes,
the testbed, and each method's public API.
"""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from hf_align import io
from hf_align.testbed import quiet_training_args


# --- files and outputs ---------------------------------------------------------------------------


def test_output_dir_that_exists_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with io.atomic_dir(out):
            pass
    assert (out / "keep.txt").read_text() == "previous run"


def test_failure_inside_atomic_dir_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_overwrite_failure_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "model.txt").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (out / "model.txt").read_text() == "v1"


def test_disk_full_on_save_leaves_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "scores.safetensors"
    io.save_tensors(target, {"a": torch.ones(3)})

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_tensors(target, {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(io.load_tensors(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["scores.safetensors"]  # no temp file left behind


def test_read_only_output_dir_leaves_nothing(tmp_path, monkeypatch):
    """Root ignores chmod, so the refusal the OS would give is simulated at the rename."""
    target = tmp_path / "plan.json"

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        io.write_json(target, {"alpha": 0.2})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    io.save_tensors(path, {"w": torch.randn(16, 16)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*not a valid safetensors file"):
        io.load_tensors(path)


def test_garbage_safetensors_names_the_file(tmp_path):
    path = tmp_path / "mask.safetensors"
    path.write_bytes(b"this is not safetensors")
    with pytest.raises(ValueError, match=r"mask\.safetensors.*not a valid safetensors file"):
        io.load_tensors(path)


def test_missing_safetensors_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        io.load_tensors(tmp_path / "nothing.safetensors")


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "neuron_mask.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"neuron_mask\.json.*not valid JSON"):
        io.read_json(path)


# --- CLI and recipes ---------------------------------------------------------------------------


TINY = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--max_steps", "1"]


def test_recipe_typo_names_the_field(tmp_path):
    from hf_align.cli.training import run_command

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: testbed\ndataset_name: testbed:preference\nbetta: 0.1\n")
    with pytest.raises(SystemExit, match="unknown field.*betta"):
        run_command("aligner-dpo", ["--config", str(recipe), *TINY, "--output_dir", str(tmp_path / "o")], launch=False)
    assert not (tmp_path / "o").exists()


def test_unknown_testbed_dataset(tmp_path):
    from hf_align.scripts.utils import load_dataset_any

    with pytest.raises(ValueError, match="'testbed:preferences': unknown testbed dataset"):
        load_dataset_any("testbed:preferences")


def test_unsupported_data_file_type(tmp_path):
    from hf_align.scripts.utils import load_dataset_any

    path = tmp_path / "pairs.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        load_dataset_any(str(path))


def test_missing_split_is_named():
    from hf_align.scripts.utils import load_dataset_any, split

    with pytest.raises(ValueError, match="split 'validation' not found; available splits: \\['train'\\]"):
        split(load_dataset_any("testbed:sft"), "validation", "dataset_name 'testbed:sft'")


def test_missing_column_is_named(tmp_path):
    from hf_align.cli.training import run_command

    argv = [
        "--model_name_or_path",
        "testbed",
        "--dataset_name",
        "testbed:prompts",
        *TINY,
        "--output_dir",
        str(tmp_path),
    ]
    # the trainers' one column check (the CLI's own copy is gone): names what is expected and what was found
    with pytest.raises(ValueError, match=r"missing columns: expected chosen\+rejected; found columns \['prompt'\]"):
        run_command("aligner-dpo", argv, launch=False)


# --- testbed -------------------------------------------------------------------------------------


def test_unknown_architecture_for_tiny_model():
    from hf_align.testbed import load_random_tiny

    with pytest.raises(ValueError, match="Unknown architecture 'gpt2'.*llama"):
        load_random_tiny("gpt2")


def test_reward_of_non_testbed_prompt():
    from hf_align.testbed import reward

    with pytest.raises(ValueError, match="Not a testbed prompt"):
        reward(["hello"], ["5"])


# --- trainers: datasets and token weights --------------------------------------------------------


def _tiny():
    from hf_align.testbed import load_random_tiny

    return load_random_tiny("llama", hidden_size=32, num_layers=2)


def _masked_dpo(tmp_path, dataset, **kwargs):
    from hf_align.testbed import load_tokenizer
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    args = MaskedDPOConfig(**quiet_training_args(output_dir=str(tmp_path / "out"), max_steps=1))
    return MaskedDPOTrainer(_tiny(), args=args, train_dataset=dataset, processing_class=load_tokenizer(), **kwargs)


def _pairs(n=4):
    from hf_align.testbed import preference_dataset

    return preference_dataset(n, seed=0).remove_columns("rejected_wrong_positions")


def test_token_weights_of_wrong_length_name_column_row_and_counts(tmp_path):
    data = _pairs().map(
        lambda ex, i: {"rejected_weights": [1.0] * (1 if i == 2 else len(ex["rejected"]))}, with_indices=True
    )
    with pytest.raises(
        ValueError,
        match=r"Column 'rejected_weights', row 2: 1 weights for (\d+) completion tokens; expected \1 \(or \d+, without",
    ):
        _masked_dpo(tmp_path, data)
    assert not (tmp_path / "out").exists()


def test_negative_token_weight_is_refused():
    from hf_align.token_weights import normalize_token_weights

    with pytest.raises(ValueError, match=r"Column 'chosen_weights', row 7: weight -0.5 at token 1 is invalid"):
        normalize_token_weights([1.0, -0.5], [5, 6], column="chosen_weights", row=7, eos_token_id=None)


def test_extra_weight_column_the_trainer_does_not_read(tmp_path):
    data = _pairs().map(lambda ex: {"completion_weights": [1.0]})
    with pytest.raises(
        ValueError, match=r"'completion_weights' column, but this trainer only reads \['chosen_weights'"
    ):
        _masked_dpo(tmp_path, data)
    assert not (tmp_path / "out").exists()


def test_weight_column_without_its_text_column(tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": ["1+1="], "chosen": ["2"], "rejected_weights": [[1.0]]})
    # the registry's column check names it, before any model is loaded
    with pytest.raises(
        ValueError, match=r"expected chosen\+rejected; found columns \['prompt', 'chosen', 'rejected_weights'\]"
    ):
        _masked_dpo(tmp_path, data)


def test_empty_train_dataset_is_named(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="train_dataset.*empty"):
        _masked_dpo(tmp_path, Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}))


def test_npo_forget_data_without_completion_column_is_named(tmp_path):
    from datasets import Dataset

    from hf_align.testbed import load_tokenizer
    from hf_align.trainers import NPOConfig, NPOTrainer

    args = NPOConfig(**quiet_training_args(output_dir=str(tmp_path / "out"), max_steps=1))
    data = Dataset.from_dict({"prompt": ["1+1="], "answer": ["3"]})
    with pytest.raises(ValueError, match=r"missing columns.*prompt\+completion"):
        NPOTrainer(_tiny(), ref_model=_tiny(), args=args, train_dataset=data, processing_class=load_tokenizer())


def test_nan_reward_in_data_pool_is_refused_and_pool_unchanged():
    from hf_align.data_pool import DataPool

    pool = DataPool(num_quantiles=2)
    pool.add(["1+1="], ["2"], scores=[1.0])
    with pytest.raises(ValueError, match=r"Non-finite score nan for row 1: quantile feedback needs finite scores"):
        pool.add(["2+2=", "3+3="], ["4", "7"], scores=[1.0, float("nan")])
    assert len(pool) == 1 and pool.completion.tolist() == ["2"]


# --- masks ---------------------------------------------------------------------------------------


def test_mask_from_a_wider_model_names_parameter_and_shapes(tmp_path):
    from hf_align.masks import NeuronMask
    from hf_align.sparse_update import has_deltas
    from hf_align.testbed import load_random_tiny

    mask = NeuronMask.random(load_random_tiny("llama", hidden_size=64, num_layers=2), 0.1, "row")
    model = _tiny()
    with pytest.raises(
        ValueError,
        match=r"Neuron mask for 'model\.layers\.0\..*' has shape \(64,\), but the parameter has shape \(32, .*another model",
    ):
        mask.validate(model)
    assert not has_deltas(model)


def test_mask_from_a_deeper_model_through_the_trainer_leaves_model_plain(tmp_path):
    from hf_align.masks import NeuronMask
    from hf_align.testbed import load_random_tiny

    mask = NeuronMask.random(load_random_tiny("llama", hidden_size=32, num_layers=3), 0.1, "row")
    with pytest.raises(
        ValueError, match=r"names \d+ parameter\(s\) the model does not have, e.g. 'model\.layers\.2\."
    ):
        _masked_dpo(tmp_path, _pairs(), neuron_mask=mask)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_mask_ratio_outside_zero_one(ratio):
    from hf_align.masks import NeuronMask

    with pytest.raises(ValueError, match=r"MaskSelection\.ratio must be (in \(0, 1\]|a finite number), got"):
        NeuronMask.random(_tiny(), ratio, "row")


def test_config_mask_ratio_outside_zero_one():
    from hf_align.trainers import MaskedDPOConfig

    with pytest.raises(ValueError, match=r"neuron_mask_ratio must be in \(0, 1\], got 1.5"):
        MaskedDPOConfig(output_dir="unused", neuron_scores_path="scores", neuron_mask_ratio=1.5, use_cpu=True)


def test_unknown_target_module_for_mask():
    from hf_align.masks import NeuronMask

    with pytest.raises(ValueError, match=r"No parameter of the model matches target='mlp\.up_projj' for row masks"):
        NeuronMask.random(_tiny(), 0.1, "row", target="mlp.up_projj")


def test_corrupt_neuron_mask_file_names_the_file(tmp_path):
    from hf_align.masks import NeuronMask

    NeuronMask.random(_tiny(), 0.1, "row").save(tmp_path / "mask")
    (tmp_path / "mask" / "neuron_mask.safetensors").write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(ValueError, match=r"neuron_mask\.safetensors.*not a valid safetensors file"):
        NeuronMask.load(tmp_path / "mask")


def test_disk_full_while_saving_a_mask_keeps_the_previous_mask(tmp_path, monkeypatch):
    from hf_align import masks
    from hf_align.masks import NeuronMask

    model = _tiny()
    previous = NeuronMask.random(model, 0.1, "row", seed=0)
    previous.save(tmp_path / "mask")

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(masks, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        NeuronMask.random(model, 0.3, "row", seed=1).save(tmp_path / "mask")
    monkeypatch.undo()
    loaded = NeuronMask.load(tmp_path / "mask")
    assert all(torch.equal(loaded.masks[n], m) for n, m in previous.masks.items())


# --- Aligner (PEFT tuner) ------------------------------------------------------------------------


def test_aligner_on_an_unsupported_architecture():
    import transformers
    from peft import get_peft_model

    from hf_align.peft_tuners import AlignerConfig

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    with pytest.raises(
        ValueError,
        match=r"Aligner does not support model_type 'gpt2' \(GPT2LMHeadModel\); supported model types: llama, mistral",
    ):
        get_peft_model(model, AlignerConfig())
    assert not any("aligner" in name for name, _ in model.named_modules())


def test_aligner_unknown_target_module():
    from peft import get_peft_model

    from hf_align.peft_tuners import AlignerConfig

    model = _tiny()
    with pytest.raises(ValueError, match="Target modules self_atn not found in the base model"):
        get_peft_model(model, AlignerConfig(start_layer=0, target_modules="self_atn"))
    assert not any("aligner" in name for name, _ in model.named_modules())


def test_aligner_start_layer_beyond_the_model():
    from peft import get_peft_model

    from hf_align.peft_tuners import AlignerConfig

    with pytest.raises(ValueError, match=r"start_layer=5 but the model has only 2 layers \(valid: 0\.\.1\)"):
        get_peft_model(_tiny(), AlignerConfig(start_layer=5))


# --- merging -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from hf_align.testbed import load_random_tiny

    root = tmp_path_factory.mktemp("checkpoints")
    for name, kwargs in {"base": {}, "wide": {"hidden_size": 64}, "deep": {"num_layers": 3}}.items():
        load_random_tiny("llama", **{"hidden_size": 32, "num_layers": 2, **kwargs}).save_pretrained(root / name)
    return root


def _merge(checkpoints, aligned, out, **kwargs):
    from hf_align.merging import merge_models

    return merge_models(checkpoints / "base", aligned, out, progress=False, **kwargs)


def test_merge_pair_with_different_shapes(checkpoints, tmp_path):
    with pytest.raises(
        ValueError, match=r"Tensor shapes differ \(21\): \['lm_head\.weight: base \(\d+, 32\) vs aligned"
    ):
        _merge(checkpoints, checkpoints / "wide", tmp_path / "out", alpha=0.5)
    assert list(tmp_path.iterdir()) == []


def test_merge_pair_with_different_depth(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"Tensor names differ: .*missing in base .*'model\.layers\.2\."):
        _merge(checkpoints, checkpoints / "deep", tmp_path / "out", alpha=0.5)
    assert list(tmp_path.iterdir()) == []


def test_merge_truncated_checkpoint_names_file_and_leaves_nothing(checkpoints, tmp_path):
    shutil.copytree(checkpoints / "base", tmp_path / "aligned")
    shard = tmp_path / "aligned" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"aligned/model\.safetensors' is truncated: tensor '.*' ends early"):
        _merge(checkpoints, tmp_path / "aligned", tmp_path / "out", alpha=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned"]  # no output, no temp dir


def test_merge_into_existing_output_is_refused_and_untouched(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous merge")
    with pytest.raises(FileExistsError, match=r"out' already exists and is not empty; pass overwrite=True"):
        _merge(checkpoints, checkpoints / "base", out, alpha=0.5)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"previous merge"


def test_disk_full_during_merge_leaves_previous_output(checkpoints, tmp_path, monkeypatch):
    from hf_align.merging import streaming

    out = tmp_path / "out"
    _merge(checkpoints, checkpoints / "base", out, alpha=0.5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = streaming.ShardWriter.write
    calls = []

    def full_disk(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:  # part of the shard is on disk, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, tensor)

    monkeypatch.setattr(streaming.ShardWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        _merge(checkpoints, checkpoints / "base", out, alpha=0.3, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the partial temp directory is gone


def test_read_only_merge_target_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """Root ignores chmod, so the refusal the OS would give is simulated at the final rename."""

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        _merge(checkpoints, checkpoints / "base", tmp_path / "out", alpha=0.5)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_recipe_typo_in_masked_dpo_mask_field(tmp_path):
    from hf_align.cli.training import run_command

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: testbed\ndataset_name: testbed:preference\nneuron_mask_ration: 0.1\n")
    with pytest.raises(SystemExit, match="hf-align masked-dpo: unknown field.*neuron_mask_ration"):
        run_command("masked-dpo", ["--config", str(recipe), *TINY, "--output_dir", str(tmp_path / "o")], launch=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("score_method: grad", "NeuronScoreArguments.score_method must be one of ('weight_diff', 'gradient')"),
        ("score_granularity: column", "NeuronScoreArguments.score_granularity must be one of ('row', 'element')"),
        ("neuron_mask_ratio: 1.5", "NeuronScoreArguments.neuron_mask_ratio must be in (0, 1], got 1.5."),
        ("neuron_mask_scope: layer", "NeuronScoreArguments.neuron_mask_scope must be one of ('global', 'tensor')"),
        ("select_ratio: 1.5", "NeuronScoreArguments.neuron_mask_ratio must be in (0, 1], got 1.5."),  # old key
    ],
)
def test_warmup_recipe_with_a_bad_score_or_select_field_names_it(tmp_path, line, expected):
    """A recipe value skips argparse's choices: the options' one declaration checks it, before any model loads."""
    from hf_align.cli.training import run_command

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: testbed\ndataset_name: testbed:preference\n{line}\n")
    with pytest.raises(ValueError) as error:
        run_command("warmup-dpo", ["--config", str(recipe), *TINY, "--output_dir", str(tmp_path / "o")], launch=False)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "o").exists()


def test_disk_full_while_saving_scores_keeps_previous_scores(tmp_path, monkeypatch):
    from hf_align import scores

    scores.save_scores(tmp_path, {"w": torch.ones(3)}, {"num_steps": 1})

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scores, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        scores.save_scores(tmp_path, {"w": torch.full((3,), 5.0)}, {"num_steps": 7})
    monkeypatch.undo()
    loaded, meta = scores.load_scores(tmp_path)
    assert torch.equal(loaded["w"], torch.ones(3)) and meta["num_steps"] == 1


def test_mask_and_score_pairs_from_different_saves_are_refused(tmp_path):
    """The one window atomic_files leaves (a crash between the two renames) is detected by the shared save id."""
    import shutil

    from hf_align import scores
    from hf_align.masks import NeuronMask

    model = _tiny()
    NeuronMask.random(model, 0.1, "row", seed=0).save(tmp_path / "a")
    NeuronMask.random(model, 0.1, "row", seed=1).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "neuron_mask.json", tmp_path / "a" / "neuron_mask.json")
    with pytest.raises(ValueError, match="come from different saves"):
        NeuronMask.load(tmp_path / "a")
    scores.save_scores(tmp_path / "s1", {"w": torch.ones(3)}, {"num_steps": 1})
    scores.save_scores(tmp_path / "s2", {"w": torch.ones(3)}, {"num_steps": 2})
    shutil.copy(tmp_path / "s2" / "neuron_scores.json", tmp_path / "s1" / "neuron_scores.json")
    with pytest.raises(ValueError, match="come from different saves"):
        scores.load_scores(tmp_path / "s1")
