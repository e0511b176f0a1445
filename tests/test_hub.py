"""Hub uploads with model cards, against a fake HfApi (no network): masks, merged models, MaskedDPO checkpoints."""

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from hf_align import testbed
from hf_align.hub import build_model_card, push_neuron_mask
from hf_align.masks import NeuronMask
from hf_align.testbed import quiet_training_args


class FakeApi:
    """Records what would be uploaded: a copy of the folder at upload time."""

    def __init__(self, root: Path):
        self.root, self.repos, self.uploads = root, [], []

    def create_repo(self, repo_id, private=None, exist_ok=False, token=None, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append((repo_id, private))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, token=None, **kwargs):
        target = self.root / f"upload{len(self.uploads)}"
        shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns(*kwargs.get("ignore_patterns") or []))
        self.uploads.append((repo_id, target))
        return f"https://huggingface.co/{repo_id}/commit/0"

    def files(self, index=-1) -> set[str]:
        return {str(p.relative_to(self.uploads[index][1])) for p in self.uploads[index][1].rglob("*") if p.is_file()}


def _metadata(card_text: str) -> dict:
    return yaml.safe_load(card_text.split("---")[1])


def test_card_has_metadata_sections_and_citation():
    card = str(
        build_model_card(
            "T", "Method text.", "load()", base_model="org/base", datasets=["org/data"],
            hyperparameters={"beta": 0.1}, citations=["allo", "npo"], tags=["x"],
        )
    )  # fmt: skip
    meta = _metadata(card)
    assert meta["base_model"] == "org/base" and meta["datasets"] == ["org/data"] and "hf-align" in meta["tags"]
    for text in ("# T", "Method text.", "| beta | `0.1` |", "## Quick start", "2406.12606", "2404.05868"):
        assert text in card
    with pytest.raises(ValueError, match="Unknown citation key"):
        build_model_card("T", "m", "l", citations=["nope"])


def test_push_neuron_mask_uploads_the_mask_and_a_card(tmp_path):
    api = FakeApi(tmp_path)
    mask = NeuronMask.random(testbed.load_random_tiny("llama", hidden_size=32, num_layers=2), 0.1, "row", seed=0)
    push_neuron_mask(mask, "me/mask", base_model="org/base", private=True, api=api)
    assert api.repos == [("me/mask", True)]
    assert api.files() == {"README.md", "neuron_mask.safetensors", "neuron_mask.json", "mask_plot.png"}
    folder = api.uploads[0][1]
    again = NeuronMask.load(folder)
    assert all(torch.equal(again.masks[k], mask.masks[k]) for k in mask.masks)
    card = (folder / "README.md").read_text()
    assert "NeuronMask.load" in card and "2406.12606" in card and _metadata(card)["base_model"] == "org/base"


def test_merge_cli_pushes_merged_model_with_card(tmp_path, monkeypatch):
    import huggingface_hub

    api = FakeApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    from hf_align.cli import main

    model_dir = str(testbed.MODEL_DIR)
    argv = ["merge", "--base", model_dir, "--aligned", model_dir, "--output", str(tmp_path / "m"), "--alpha", "0.3"]
    assert main([*argv, "--no-progress", "--push_to_hub", "me/merged"]) == 0
    files = api.files()
    assert {"README.md", "config.json", "merge_plan.json"} <= files and any(f.endswith(".safetensors") for f in files)
    card = (api.uploads[0][1] / "README.md").read_text()
    assert "| all | 0.3 |" in card and "linear α=0.3" in card and "2309.06256" in card and "AMA" in card
    assert model_dir not in card  # a local path never reaches the card


def test_a_merge_writes_its_own_card_naming_both_inputs_as_hub_ids(tmp_path):
    import shutil

    from hf_align.merging import merge_models

    snapshots = {}
    for name in ("base", "aligned"):
        snapshots[name] = tmp_path / "hub" / f"models--org--tiny-{name}" / "snapshots" / "0123abc"
        shutil.copytree(testbed.MODEL_DIR, snapshots[name])
    merge_models(snapshots["base"], snapshots["aligned"], tmp_path / "merged", alpha=0.25, progress=False)
    card = (tmp_path / "merged" / "README.md").read_text()
    meta = _metadata(card)
    assert meta["base_model"] == ["org/tiny-aligned", "org/tiny-base"] and meta["base_model_relation"] == "merge"
    assert (
        "| all | 0.25 |" in card
        and "# Model Card for AMA merge of org/tiny-aligned" in card
        and str(tmp_path) not in card
    )


@pytest.mark.parametrize("save_merged", [True, False])
def test_masked_dpo_push_to_hub_uploads_merged_or_deltas_with_allo_card(tmp_path, monkeypatch, save_merged):
    import transformers.trainer

    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    api = FakeApi(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda *a, **k: api)
    tb = testbed.load()
    model = copy.deepcopy(tb.model)
    args = MaskedDPOConfig(**quiet_training_args(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
        hub_model_id="me/allo",
        save_merged=save_merged, gradient_checkpointing=False,
    ))  # fmt: skip
    trainer = MaskedDPOTrainer(
        model=model, args=args, train_dataset=tb.preference_dataset(4), processing_class=tb.tokenizer,
        neuron_mask=NeuronMask.random(model, 0.1, "row", seed=0),
    )  # fmt: skip
    trainer.train()
    trainer.push_to_hub(dataset_name="testbed:preference")
    files = api.files()
    if save_merged:
        assert "model.safetensors" in files and "neuron_deltas.safetensors" not in files
    else:
        assert {"neuron_deltas.safetensors", "neuron_mask.safetensors", "neuron_mask.json"} <= files
        assert "model.safetensors" not in files
    card = (api.uploads[-1][1] / "README.md").read_text()
    assert "MaskedDPO" in card and "2406.12606" in card and "hf-align" in card


def test_select_mask_cli_pushes_the_mask(tmp_path, monkeypatch):
    import huggingface_hub

    from hf_align.cli import main
    from hf_align.scores import save_scores

    api = FakeApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    save_scores(tmp_path / "warm", {"model.layers.0.mlp.up_proj.weight": torch.rand(8)}, {"method": "gradient"})
    argv = ["select-mask", "--scores", str(tmp_path / "warm"), "--ratio", "0.25", "--output", str(tmp_path / "m")]
    assert main([*argv, "--push_to_hub", "me/mask"]) == 0
    assert api.repos == [("me/mask", None)] and "neuron_mask.safetensors" in api.files()
