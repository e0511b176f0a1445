"""Config semantics TRL tolerates but that train the wrong thing: ``max_steps`` 0 or below -1, ``num_train_epochs`` ≤ 0
without ``max_steps``, a neuron mask that selects nothing — each a one-line UserError at config / trainer build."""

import pytest
import torch

import hf_align.trainers
from hf_align.errors import UserError


CONFIGS = [name for name in hf_align.trainers.__all__ if name.endswith("Config")]


def _config(name, tmp_path, **values):
    return getattr(hf_align.trainers, name)(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, **values
    )


def test_every_trainer_config_is_covered():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("max_steps", [0, -2, -5, -1000])
def test_max_steps_zero_or_below_minus_one_is_refused(tmp_path, config, max_steps):
    with pytest.raises(UserError, match=rf"{config}\.max_steps must be a positive number.*got {max_steps}") as err:
        _config(config, tmp_path, max_steps=max_steps)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("epochs", [0, 0.0, -1, -0.5])
def test_non_positive_epochs_without_max_steps_are_refused(tmp_path, config, epochs):
    with pytest.raises(UserError, match=rf"{config}\.num_train_epochs must be"):
        _config(config, tmp_path, num_train_epochs=epochs)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("values", [dict(max_steps=3, num_train_epochs=0), dict(max_steps=1),
                                    dict(max_steps=-1, num_train_epochs=0.25), dict()])  # fmt: skip
def test_meaningful_lengths_are_accepted(tmp_path, config, values):
    _config(config, tmp_path, **values)


# ------------------------------------------------------------------------------------ all-False mask


def _empty_mask():
    from hf_align.masks import NeuronMask
    from hf_align.testbed import load_random_tiny

    model = load_random_tiny("llama", hidden_size=32, num_layers=2)
    mask = NeuronMask.random(model, 0.25, "row", seed=0)
    with pytest.warns(UserWarning, match="selects no neuron"):
        return NeuronMask({name: torch.zeros_like(m) for name, m in mask.masks.items()}), model


def _build(trainer, model, tmp_path, mask_argument=None, **config_values):
    from hf_align import testbed
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer, NPOConfig, NPOTrainer

    common = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=1, **config_values)
    tok = testbed.load_tokenizer()
    if trainer == "npo":
        return NPOTrainer(model, args=NPOConfig(**common), train_dataset=testbed.forget_dataset(2, seed=0),
                          processing_class=tok, neuron_mask=mask_argument)  # fmt: skip
    return MaskedDPOTrainer(model, args=MaskedDPOConfig(**common), train_dataset=testbed.preference_dataset(2, seed=0),
                            processing_class=tok, neuron_mask=mask_argument)  # fmt: skip


@pytest.mark.parametrize("trainer", ["npo", "masked_dpo"])
@pytest.mark.parametrize("given", ["object", "path argument", "neuron_mask_path"])
def test_a_mask_selecting_nothing_is_refused_at_trainer_build(tmp_path, trainer, given):
    """Before: a warning, then the run died in autograd (no parameter requires a gradient)."""
    mask, model = _empty_mask()
    mask.save(tmp_path / "mask")
    argument = {"object": mask, "path argument": str(tmp_path / "mask"), "neuron_mask_path": None}[given]
    extra = {"neuron_mask_path": str(tmp_path / "mask")} if given == "neuron_mask_path" else {}
    with pytest.raises(UserError, match="selects no neuron") as err:
        _build(trainer, model, tmp_path, argument, **extra)
    assert "\n" not in str(err.value)
    if given != "object":
        assert str(tmp_path / "mask") in str(err.value)
