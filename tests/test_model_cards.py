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


def _run_card_quick_start(folder, extra: str = "") -> str:
    """Run the card's quick start as written, from the folder's parent (its repo is ``./<folder>``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_hub_roundtrip import quick_start

    script = quick_start((Path(folder) / "README.md").read_text()) + "\n" + extra
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(folder).parent, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, f"{script}\n{result.stderr[-3000:]}"
    return result.stdout


def test_an_npo_card_shows_npos_settings_not_sfts(tmp_path):
    """Fails on main: the card showed SFT's `loss_type: nll` and no NPO or retain setting."""
    from hf_align.trainers import NPOConfig, NPOTrainer

    tb = testbed.load()
    args = NPOConfig(**quiet_training_args(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, gradient_checkpointing=False,
        npo_level="token", retain_weight=0.5, beta=0.2, lr_scheduler_type="cosine",
    ))  # fmt: skip
    trainer = NPOTrainer(model=tb.model, args=args, train_dataset=tb.forget_dataset(4), processing_class=tb.tokenizer)
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    for row in ("| beta | `0.2` |", "| npo_level | `token` |", "| npo_loss_type | `npo` |",
                "| retain_loss_type | `nll` |", "| retain_weight | `0.5` |", "| lr_scheduler_type | `cosine` |"):  # fmt: skip
        assert row in card, row
    assert "| loss_type |" not in card and "SchedulerType" not in card and str(tmp_path) not in card
    assert "@article{zhang2024npo" in card and "@software{vonwerra2020trl" in card and "- TRL: " in card


def test_a_feedback_card_gives_the_conditioning_prefix_and_a_snippet_that_generates_with_it(tmp_path):
    """Fails on main: the `<|quantile_0|>` prefix was only in training_args.json."""
    from datasets import Dataset

    from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer

    data = Dataset.from_dict({"prompt": ["1+2=", "4+4="], "completion": ["3", "9"], "feedback": [1.0, 0.0]})
    config = FeedbackConditionedConfig(**quiet_training_args(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_quantiles=2, max_completion_length=4,
    ))  # fmt: skip
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64)
    trainer = FeedbackConditionedTrainer(model, config, data, processing_class=testbed.load_tokenizer())
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Conditioning" in card and "`<|quantile_0|>`, `<|quantile_1|>`" in card
    assert "'<|quantile_0|> input: Write a short answer.'" in card and "model.generate(" in card
    _run_card_quick_start(tmp_path / "out")  # loads ./out and generates with the prefix, as written


@pytest.mark.slow
def test_warmup_dpo_writes_a_card_whose_quick_start_loads_its_scores_and_mask(tmp_path):
    """Fails on main: `hf-align warmup-dpo` wrote no card."""
    from hf_align.cli import main

    out = tmp_path / "warm"
    argv = ["warmup-dpo", "--model_name_or_path", "testbed", "--dataset_name", "testbed:preference", "--max_steps",
            "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none", "--output_dir",
            str(out), "--neuron_mask_ratio", "0.1", "--save_strategy", "no"]  # fmt: skip
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    meta = _meta(card)
    assert meta["library_name"] == "hf-align" and "allo-warmup" in meta["tags"] and "testbed:preference" in card
    assert "2406.12606" in card and str(tmp_path) not in card
    printed = _run_card_quick_start(out, "print(len(scores), mask.num_selected)")
    assert printed.split() and int(printed.split()[1]) > 0


def test_a_card_links_the_tracking_run(monkeypatch):
    import trl.trainer.utils

    from hf_align.trainers.cards import tracking_links

    monkeypatch.setattr(trl.trainer.utils, "get_trackio_space_url", lambda: "https://huggingface.co/spaces/me/trackio")
    links = tracking_links()
    assert links["Trackio"] == "https://huggingface.co/spaces/me/trackio"
    card = str(build_model_card("T", "m", "load()", tracking=links))
    assert "- [Trackio](https://huggingface.co/spaces/me/trackio)" in card
