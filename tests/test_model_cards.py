"""Model cards are written with every saved artifact: method and paper, the base model as a Hub id (never a local
path), the data, the hyperparameters, the neuron mask and how to load the result (built with huggingface_hub)."""

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from hf_align import testbed
from hf_align.hub import build_model_card, hub_id
from hf_align.masks import NeuronMask
from hf_align.testbed import quiet_training_args
from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer


def _meta(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def _model_folder(tmp_path, with_card: bool):
    tb = testbed.load()
    folder = tmp_path / "local-base"
    tb.model.save_pretrained(folder)
    tb.tokenizer.save_pretrained(folder)
    if with_card:
        ModelCard.from_template(ModelCardData(base_model="org/tiny-base")).save(folder / "README.md")
    return str(folder)


def _train(tmp_path, model, **overrides):
    tb = testbed.load()
    args = MaskedDPOConfig(**quiet_training_args(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
        gradient_checkpointing=False, beta=0.25, **overrides,
    ))  # fmt: skip
    trainer = MaskedDPOTrainer(
        model=model, args=args, train_dataset=tb.preference_dataset(4), processing_class=tb.tokenizer,
        neuron_mask=NeuronMask.random(tb.model, 0.1, "row", seed=0),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    return trainer, (tmp_path / "out" / "README.md").read_text()


def test_a_saved_trainer_output_carries_a_full_card(tmp_path):
    folder = _model_folder(tmp_path, with_card=True)
    trainer, card = _train(tmp_path, folder, rejected_token_ratio=0.5)
    meta = _meta(card)
    assert meta["base_model"] == "org/tiny-base"  # the Hub id the local folder's own card names
    assert str(tmp_path) not in card  # no local path anywhere
    assert "hf-align" in meta["tags"] and "masked-dpo" in meta["tags"]
    for text in (
        "`MaskedDPOTrainer` (MaskedDPO)", "2406.12606", "| beta | `0.25` |", "| rejected_token_ratio | `0.5` |",
        "## Neuron mask", "granularity: `row`", f"selected: {trainer.neuron_mask.num_selected} of",
        'AutoModelForCausalLM.from_pretrained("./out")', "@article{chen2024allo",
    ):  # fmt: skip
        assert text in card, text
    assert "[None]" not in card
    # the mask plot is written at train begin and the card shows it
    assert (
        tmp_path / "out" / "mask_plot.png"
    ).is_file() and "![Neurons trained per layer and module](mask_plot.png)" in card


def test_a_local_base_without_a_card_names_no_base_model(tmp_path):
    _, card = _train(tmp_path, _model_folder(tmp_path, with_card=False))
    assert "base_model" not in _meta(card)
    assert str(tmp_path) not in card


def test_a_deltas_only_save_says_how_to_load_the_deltas(tmp_path):
    from hf_align.callbacks import NoOpWarningCallback

    # lr 0: nothing trains, and one line says so; plots=False: no PNG and no image link in the card
    trainer, card = _train(
        tmp_path, testbed.load().model, save_merged=False, plots=False, learning_rate=0.0, logging_steps=1
    )
    assert "load_deltas(AutoModelForCausalLM.from_pretrained(" in card
    assert not list((tmp_path / "out").glob("*.png")) and "mask_plot.png" not in card
    (check,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoOpWarningCallback)]
    assert len(check.warned) == 1 and "no trainable parameter changed in the first 1 step(s)" in check.warned[0]


def test_hub_id_never_returns_a_local_path(tmp_path):
    assert hub_id("org/name") == "org/name" and hub_id("gpt2") == "gpt2"
    assert hub_id(str(tmp_path / "missing")) is None and hub_id("./relative/model") is None and hub_id(None) is None
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id(str(snapshot)) == "org/cached"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert hub_id(str(plain)) is None
    card = str(build_model_card("T", "m", "l", base_model=str(plain)))
    assert "base_model" not in _meta(card) and str(plain) not in card


def test_a_raw_bibtex_citation_is_accepted_and_unknown_keys_are_not():
    card = str(build_model_card("T", "m", "l", citations=["@misc{x, title={Y}}"]))
    assert "@misc{x, title={Y}}" in card
    with pytest.raises(ValueError, match="Unknown citation key"):
        build_model_card("T", "m", "l", citations=["nope"])
