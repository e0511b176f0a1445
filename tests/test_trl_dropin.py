"""A TRL user changes one import: hf-align trainers take what TRL's take (a model path, the parent TRL config)."""

import dataclasses

import pytest
import torch
import trl

from hf_align import testbed
from hf_align.masks import NeuronMask
from hf_align.testbed import quiet_training_args
from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer
from hf_align.trainers._base import resolve_args


COMMON = quiet_training_args(
    max_steps=1, per_device_train_batch_size=2,
    gradient_checkpointing=False, learning_rate=1e-2,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tb = testbed.load()
    path = tmp_path_factory.mktemp("model")
    tb.model.save_pretrained(path)
    tb.tokenizer.save_pretrained(path)
    return str(path)


def _dpo(tmp_path, **kwargs):
    tb = testbed.load()
    kwargs.setdefault("args", MaskedDPOConfig(output_dir=str(tmp_path / "out"), **COMMON))
    return MaskedDPOTrainer(train_dataset=tb.preference_dataset(4), processing_class=tb.tokenizer, **kwargs)


def test_masked_dpo_takes_a_model_path_with_a_mask(tmp_path, model_dir):
    mask = NeuronMask.random(testbed.load().model, 0.1, "row", seed=0)
    trainer = _dpo(tmp_path, model=model_dir, neuron_mask=mask)
    trainer.train()
    assert 0 < trainer.trainable_fraction < 0.2
    assert type(trainer.ref_model).__name__ == "DeltasOffReference"


@pytest.mark.parametrize("with_mask", [False, True])
def test_masked_dpo_takes_a_reference_path(tmp_path, model_dir, with_mask):
    mask = NeuronMask.random(testbed.load().model, 0.1, "row", seed=0) if with_mask else None
    trainer = _dpo(tmp_path, model=model_dir, ref_model=model_dir, neuron_mask=mask)
    trainer.train()
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert reference is not trainer.accelerator.unwrap_model(trainer.model)
    saved = dict(testbed.load().model.named_parameters())
    for name, param in reference.named_parameters():  # the reference is the saved model, untouched by training
        torch.testing.assert_close(param, saved[name], atol=0, rtol=0, msg=name)


def test_masked_dpo_upgrades_a_trl_dpo_config(tmp_path):
    theirs = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=["ipo"], max_length=77, **COMMON)
    trainer = _dpo(tmp_path, model=testbed.load().model, args=theirs)
    ours = trainer.args
    assert type(ours) is MaskedDPOConfig
    assert (ours.output_dir, ours.beta, ours.loss_type, ours.max_length) == (theirs.output_dir, 0.3, ["ipo"], 77)
    assert (ours.neuron_mask_path, ours.rejected_token_ratio, ours.save_merged) == (None, None, True)
    for f in dataclasses.fields(trl.DPOConfig):
        if f.init and f.name not in ("logging_dir",):
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def test_other_configs_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"args must be a MaskedDPOConfig \(or a DPOConfig.*got SFTConfig"):
        _dpo(tmp_path, model=testbed.load().model, args=trl.SFTConfig(output_dir=str(tmp_path), **COMMON))


@dataclasses.dataclass
class _Config:
    output_dir: str


def test_without_args_the_output_dir_is_named_as_trl_names_it():
    assert resolve_args(None, _Config, object, "org/my-model", "MaskedDPO").output_dir == "my-model-MaskedDPO"
    model = testbed.load().model
    model.config._name_or_path = "/some/where/tiny-llama"
    assert resolve_args(None, _Config, object, model, "NPO").output_dir == "tiny-llama-NPO"


def _npo(tmp_path, **kwargs):
    from hf_align.trainers import NPOConfig, NPOTrainer

    tb = testbed.load()
    kwargs.setdefault("args", NPOConfig(output_dir=str(tmp_path / "npo"), **COMMON))
    return NPOTrainer(train_dataset=tb.preference_dataset(4), processing_class=tb.tokenizer, **kwargs)


def test_npo_takes_a_model_path_with_a_mask_and_a_reference_path(tmp_path, model_dir):
    mask = NeuronMask.random(testbed.load().model, 0.1, "row", seed=0)
    trainer = _npo(tmp_path, model=model_dir, neuron_mask=mask)
    trainer.train()
    assert 0 < trainer.trainable_fraction < 0.2
    trainer = _npo(tmp_path, model=model_dir, ref_model=model_dir)
    trainer.train()
    saved = dict(testbed.load().model.named_parameters())
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, saved[name], atol=0, rtol=0, msg=name)


def test_npo_upgrades_a_trl_sft_config(tmp_path):
    from hf_align.trainers import NPOConfig

    theirs = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_length=99, **COMMON)
    ours = _npo(tmp_path, model=testbed.load().model, args=theirs).args
    assert type(ours) is NPOConfig and (ours.output_dir, ours.max_length) == (theirs.output_dir, 99)
    assert (ours.npo_loss_type, ours.beta, ours.npo_level) == ("npo", 0.1, "sequence")  # NPO's own defaults
    with pytest.raises(TypeError, match=r"args must be a NPOConfig \(or a SFTConfig.*got DPOConfig"):
        _npo(tmp_path, model=testbed.load().model, args=trl.DPOConfig(output_dir=str(tmp_path), **COMMON))


def test_masked_dpo_takes_a_quantization_config_with_a_model_path_and_a_mask(tmp_path, model_dir):
    """TRL's `quantization_config=` trainer argument: applied when hf-align loads the path (a mask needs the model
    first); before, TRL refused it as 'model is already instantiated'."""
    from transformers import BitsAndBytesConfig

    from hf_align.sparse_update import iter_deltas

    mask = NeuronMask.random(testbed.load().model, 0.1, "row", seed=0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    trainer = _dpo(tmp_path, model=model_dir, neuron_mask=mask, quantization_config=quant)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert getattr(model, "is_loaded_in_4bit", False)
    before = [h.delta.detach().clone() for h in iter_deltas(model)]
    trainer.train()
    assert any(not torch.equal(a, h.delta) for a, h in zip(before, iter_deltas(model), strict=True))
    (check,) = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "NoOpWarningCallback"]
    assert check.warned == [  # the 4-bit base confirmed in one line; the deltas moved, so nothing else
        "hf-align: base model loaded in 4-bit (nf4, compute dtype float32); trainable weights stay unquantized."
    ]
    with pytest.raises(ValueError, match="quantization_config is set both"):
        args = MaskedDPOConfig(
            output_dir=str(tmp_path / "x"), model_init_kwargs={"quantization_config": quant}, **COMMON
        )
        _dpo(tmp_path, model=model_dir, neuron_mask=mask, quantization_config=quant, args=args)
