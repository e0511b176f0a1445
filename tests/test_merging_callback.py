"""AMAMergeCallback writes a loadable averaged model next to each checkpoint and at train end."""

import pytest
import torch
from safetensors.torch import load_file

from hf_align.testbed import quiet_training_args


def test_callback_writes_loadable_merged_models_and_pushes(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_align.callbacks import AMAMergeCallback
    from hf_align.testbed import load_random_tiny

    model = load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=32)
    model.save_pretrained(tmp_path / "base")
    base = load_file(tmp_path / "base" / "model.safetensors")
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, commit_message, token=None):
            uploads.append(
                ("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    callback = AMAMergeCallback(tmp_path / "base", alpha=0.25, push_to_hub=True, hub_repo_id="me/ama")
    ids = tokenizer(["1+2=3"] * 4)["input_ids"]
    data = [{"input_ids": i, "labels": i} for i in ids]
    args = TrainingArguments(**quiet_training_args(
        output_dir=str(tmp_path / "out"), max_steps=2, save_steps=1, save_strategy="steps", learning_rate=1e-2,
        per_device_train_batch_size=2,
    ))  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

    merged = tmp_path / "out" / "checkpoint-2" / "ama_merged"
    trained = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(merged)
    for name, param in loaded.state_dict().items():
        torch.testing.assert_close(param, 0.25 * base[name] + 0.75 * trained[name], rtol=0, atol=1e-6)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ama_merged")
    torch.testing.assert_close(final.state_dict()["lm_head.weight"], loaded.state_dict()["lm_head.weight"])
    assert (tmp_path / "out" / "checkpoint-1" / "ama_merged" / "merge_plan.json").exists()
    assert len(callback.merged_dirs) == 3
    assert [u[0] for u in uploads] == ["create", "upload"] * 3 and "model.safetensors" in uploads[1][2]


def test_callback_arguments_are_checked():
    from hf_align.callbacks import AMAMergeCallback

    with pytest.raises(ValueError, match="exactly one"):
        AMAMergeCallback("base")
    with pytest.raises(ValueError, match="alpha must be in"):
        AMAMergeCallback("base", alpha=2.0)
    with pytest.raises(ValueError, match="hub_repo_id"):
        AMAMergeCallback("base", alpha=0.1, push_to_hub=True)


@pytest.mark.parametrize("save_merged", [True, False])
def test_callback_merges_a_masked_trainers_checkpoints_and_final_model(tmp_path, save_merged):
    """A masked trainer's model holds neuron deltas (parametrizations), and with save_merged=False its checkpoints
    hold only the deltas: every merge still averages the base with the plain weights the deltas make."""
    from hf_align import testbed
    from hf_align.callbacks import AMAMergeCallback
    from hf_align.masks import NeuronMask
    from hf_align.sparse_update import merged_state_dict
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    tb = testbed.load()
    base = load_file(testbed.MODEL_DIR / "model.safetensors")
    callback = AMAMergeCallback(testbed.MODEL_DIR, alpha=0.5)
    args = MaskedDPOConfig(**quiet_training_args(
        output_dir=str(tmp_path / "run"), max_steps=1, save_steps=1, save_strategy="steps",
        per_device_train_batch_size=2, gradient_checkpointing=False, learning_rate=1e-2, save_merged=save_merged,
    ))  # fmt: skip
    trainer = MaskedDPOTrainer(
        model=str(testbed.MODEL_DIR), args=args, train_dataset=tb.preference_dataset(4),
        processing_class=tb.tokenizer, neuron_mask=NeuronMask.random(tb.model, 0.1, "row", seed=0),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    trained = {k: v.detach() for k, v in merged_state_dict(trainer.accelerator.unwrap_model(trainer.model)).items()}
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    for folder in (tmp_path / "run" / "checkpoint-1" / "ama_merged", tmp_path / "run" / "ama_merged"):
        merged = load_file(folder / "model.safetensors")
        for name in base:
            torch.testing.assert_close(merged[name], 0.5 * base[name] + 0.5 * trained[name], rtol=0, atol=1e-6)
