"""A ``.gguf`` file wherever a model is taken: merges, ``select-mask --init/--trained``, ``eval`` (model and
reference), the trainers' string policy and ``ref_model``, adaptive-merge; what is saved names the GGUF source in
its card; a bad file is one line naming it, before any model is loaded or converted.

The GGUF files are the testbed model written by ``tests/gguf_files.py`` (no download): expectations come from the
testbed's own safetensors, never from the GGUF path under test.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_align.errors import UserError
from hf_align.testbed import MODEL_DIR, quiet_training_args


gguf = pytest.importorskip("gguf") if not os.environ.get("CI") else __import__("gguf")
from gguf_files import write_gguf  # noqa: E402


REPO_URL = "https://huggingface.co/org/tiny-gguf"
TESTBED = load_file(MODEL_DIR / "model.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An F32 GGUF with a Hub address in its header, a Q8_0 one without, a truncated one, and an aligned folder (the
    testbed with noise) to merge with or score against."""
    root = tmp_path_factory.mktemp("gguf")
    plain = write_gguf(root / "tiny.F32.gguf", repo_url=REPO_URL)
    quantized = write_gguf(root / "tiny.Q8_0.gguf", quant="Q8_0")
    whole = plain.read_bytes()
    (root / "bad.gguf").write_bytes(whole[: len(whole) // 2])
    aligned = root / "aligned"
    aligned.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file(
        {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in TESTBED.items()}, aligned / "model.safetensors"
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (aligned / name).write_bytes((MODEL_DIR / name).read_bytes())
    return {"plain": plain, "q8": quantized, "bad": root / "bad.gguf", "aligned": aligned}


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob(".hf_align_gguf_*")}


def test_the_written_gguf_is_the_testbed(files):
    """The test files are right: transformers' loader gives the testbed's exact weights and tokens back."""
    from hf_align.loading import load_model, load_tokenizer
    from hf_align.testbed import load_tokenizer as testbed_tokenizer

    model = load_model(files["plain"], dtype="float32")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, TESTBED[name].float()), name
    text = "12+30=42 and more"
    assert load_tokenizer(files["plain"])(text).input_ids == testbed_tokenizer()(text).input_ids
    assert model.config.name_or_path == str(files["plain"])  # the file, not its folder: what the card reads


def test_header_gives_hub_id_and_quant_never_a_parent(tmp_path, files):
    from hf_align.gguf import read_gguf_info
    from hf_align.hub import hub_id

    assert (read_gguf_info(files["plain"]).hub_id, read_gguf_info(files["plain"]).quant) == ("org/tiny-gguf", "F32")
    assert (read_gguf_info(files["q8"]).hub_id, read_gguf_info(files["q8"]).quant) == (None, "Q8_0")
    parent = write_gguf(tmp_path / "child.gguf", **{"base_model.0.repo_url": "https://huggingface.co/org/parent"})
    assert read_gguf_info(parent).hub_id is None  # general.base_model.* names what it was fine-tuned from
    source = write_gguf(tmp_path / "src.gguf", **{"source.url": "https://huggingface.co/org/source/"})
    assert hub_id(str(source)) == "org/source" and hub_id(str(files["q8"])) is None


def test_merge_takes_gguf_inputs(tmp_path, files):
    """θ = α·θ_gguf + (1−α)·θ_aligned from the testbed's own weights; card: the GGUF's Hub id and its file line;
    the temporary conversion is gone."""
    from hf_align.merging import merge_models

    before = _leftovers()
    out = merge_models(files["plain"], files["aligned"], tmp_path / "m", alpha=0.3, progress=False).output_dir
    merged, aligned = load_file(out / "model.safetensors"), load_file(files["aligned"] / "model.safetensors")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.3 * TESTBED[name] + 0.7 * aligned[name], rtol=1e-6, atol=1e-7)
    card = (out / "README.md").read_text()
    assert "org/tiny-gguf" in card and "`tiny.F32.gguf` (quantization F32" in card
    assert str(files["plain"].parent) not in card
    assert _leftovers() == before

    out = merge_models(files["aligned"], files["q8"], tmp_path / "q", alpha=1.0, progress=False).output_dir
    assert "(quantization Q8_0" in (out / "README.md").read_text()  # the aligned side may be a GGUF too


def test_merge_cli_refuses_a_bad_gguf_before_converting_the_other(tmp_path, files, monkeypatch, capsys):
    import hf_align.loading
    from hf_align.cli import main

    def never(*args, **kwargs):
        raise AssertionError("converted before every header was checked")

    monkeypatch.setattr(hf_align.loading, "convert_gguf", never)
    argv = ["merge", "--base_model_name_or_path", str(files["plain"]), "--model_name_or_path", str(files["bad"])]
    assert main([*argv, "--alpha", "0.5", "--output_dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(files["bad"]) in err and "truncated or damaged" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_select_mask_scores_a_gguf_init(tmp_path, files):
    """|θ_trained − θ_init| with θ_init read from the GGUF equals the difference from the testbed's weights."""
    from hf_align.cli import main
    from hf_align.scores import load_scores

    argv = ["select-mask", "--init", str(files["plain"]), "--trained", str(files["aligned"])]
    assert main([*argv, "--neuron_mask_ratio", "0.1", "--output_dir", str(tmp_path / "mask")]) == 0
    scores, _ = load_scores(tmp_path / "mask")
    aligned = load_file(files["aligned"] / "model.safetensors")
    for name, score in scores.items():
        torch.testing.assert_close(score, (aligned[name] - TESTBED[name]).abs(), rtol=0, atol=0)
    bad = ["select-mask", "--init", str(files["bad"]), "--trained", str(files["aligned"])]
    with pytest.raises(UserError, match="bad.gguf: not a readable GGUF"):
        from hf_align.cli.select_mask import main as select_main

        select_main([*bad[1:], "--neuron_mask_ratio", "0.1", "--output_dir", str(tmp_path / "other")])


def test_eval_takes_gguf_model_and_reference(tmp_path, files):
    """The GGUF (Q8_0) against itself as reference: KL exactly 0, every comparison a tie."""
    from hf_align.cli import main

    out = tmp_path / "r.json"
    argv = ["eval", "--model_name_or_path", str(files["q8"]), "--reference_model", str(files["q8"])]
    argv += ["--dataset_name", "testbed:prompts", "--num_prompts", "4", "--max_new_tokens", "4", "--reward", "testbed"]
    assert main([*argv, "--output_file", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["kl"] == 0.0 and metrics["ties"] == 4
    bad = [*argv[:3], "--reference_model", str(files["bad"]), *argv[5:], "--output_file", str(tmp_path / "b.json")]
    assert main(bad) == 2 and not (tmp_path / "b.json").exists()


def _card_and_config(folder: Path) -> tuple[str, str]:
    return (folder / "README.md").read_text(), (folder / "config.json").read_text()


def test_masked_dpo_from_a_gguf_with_a_gguf_reference_names_it_in_its_card(tmp_path, files):
    from hf_align import testbed
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    args = MaskedDPOConfig(**quiet_training_args(output_dir=str(tmp_path / "dpo"), max_steps=1,
                                                 per_device_train_batch_size=2))  # fmt: skip
    trainer = MaskedDPOTrainer(
        str(files["plain"]), ref_model=str(files["q8"]), args=args, train_dataset=testbed.preference_dataset(2)
    )
    assert trainer.ref_model.config.name_or_path == str(files["q8"])
    trainer.train()
    trainer.save_model()
    card, config = _card_and_config(tmp_path / "dpo")
    assert "base_model: org/tiny-gguf" in card and "`tiny.F32.gguf` (quantization F32" in card
    assert str(files["plain"].parent) not in card + config


def test_npo_from_a_quantized_gguf_builds_its_reference_and_has_no_base_model(tmp_path, files):
    """No Hub address in the header: no base_model (never a local path), the GGUF line; NPO's own reference and
    the tokenizer come from the same file (TRL cannot load either by that name)."""
    from hf_align import testbed
    from hf_align.trainers import NPOConfig, NPOTrainer

    args = NPOConfig(**quiet_training_args(output_dir=str(tmp_path / "npo"), max_steps=1,
                                           per_device_train_batch_size=2))  # fmt: skip
    trainer = NPOTrainer(str(files["q8"]), args=args, train_dataset=testbed.forget_dataset(2))
    trainer.train()
    trainer.save_model()
    card, config = _card_and_config(tmp_path / "npo")
    assert "base_model" not in card.split("---")[1] and "`tiny.Q8_0.gguf` (quantization Q8_0" in card
    assert str(files["q8"].parent) not in card + config


def test_a_bad_gguf_reference_is_refused_before_the_policy_loads(tmp_path, files, monkeypatch):
    import hf_align.loading
    from hf_align import testbed
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    monkeypatch.setattr(hf_align.loading, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    args = MaskedDPOConfig(**quiet_training_args(output_dir=str(tmp_path / "x"), max_steps=1))
    with pytest.raises(UserError, match="bad.gguf: not a readable GGUF"):
        MaskedDPOTrainer(str(files["plain"]), ref_model=str(files["bad"]), args=args,
                         train_dataset=testbed.preference_dataset(2))  # fmt: skip


def test_adaptive_merge_takes_a_gguf_base(tmp_path, files):
    """θ0 from the GGUF: the learned α's (untrained: init_val) merge the testbed's weights with the aligned ones."""
    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer

    args = AdaptiveMergeConfig(**quiet_training_args(output_dir=str(tmp_path / "ama"), max_steps=1), epsilon=0.0)
    trainer = AdaptiveMergeTrainer(str(files["aligned"]), base_model=str(files["plain"]), args=args)
    out = trainer.merge(tmp_path / "merged", progress=False, plot=False).output_dir
    merged, aligned = load_file(out / "model.safetensors"), load_file(files["aligned"] / "model.safetensors")
    plan = json.loads((out / "merge_plan.json").read_text())
    name = "model.layers.2.mlp.down_proj.weight"
    alpha = plan["alphas"][name]
    torch.testing.assert_close(merged[name], alpha * TESTBED[name] + (1 - alpha) * aligned[name])
    assert "org/tiny-gguf" in (out / "README.md").read_text()


def test_quark_from_a_gguf_names_it_in_its_card(tmp_path, files):
    """Feedback-conditioned training (offline rows) from the GGUF: tokenizer from the same file, card names it."""
    from datasets import Dataset

    from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer

    rows = {"prompt": ["1+2=", "4+4="], "completion": ["3", "9"], "feedback": [1.0, 0.0]}
    config = FeedbackConditionedConfig(**quiet_training_args(
        output_dir=str(tmp_path / "quark"), per_device_train_batch_size=2, num_rounds=1, steps_per_round=1,
        num_quantiles=2, max_completion_length=4,
    ))  # fmt: skip
    trainer = FeedbackConditionedTrainer(str(files["plain"]), config, Dataset.from_dict(rows))
    trainer.train()
    trainer.save_model()
    card, config_text = _card_and_config(tmp_path / "quark")
    assert "base_model: org/tiny-gguf" in card and "`tiny.F32.gguf` (quantization F32" in card
    assert str(files["plain"].parent) not in card + config_text


@pytest.mark.parametrize("command, data", [("warmup-dpo", "testbed:preference"), ("aligner-sft", "testbed:sft")])
def test_trl_commands_take_a_gguf(tmp_path, files, command, data):
    """TRL's trainers behind warm-up DPO and Aligner get the GGUF loaded by hf-align (TRL's loader knows none):
    the warm-up's reference and tokenizer, the Aligner's config check, read from the same file."""
    from hf_align.cli import main

    out = tmp_path / command
    argv = [command, "--model_name_or_path", str(files["q8"]), "--dataset_name", data, "--max_steps", "1"]
    argv += [
        "--per_device_train_batch_size",
        "2",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--use_cpu",
        "true",
    ]
    argv += ["--bf16", "false", "--save_strategy", "no", "--plots", "false"]
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    assert "`tiny.Q8_0.gguf` (quantization Q8_0" in card and str(files["q8"].parent) not in card


@pytest.mark.slow
def test_the_allo_pipeline_runs_on_a_gguf(tmp_path, files):
    """Every stage of the testbed ALLO pipeline (warm-up DPO, masks, key-token labels, NPO, masked DPO) takes the
    GGUF as the pipeline's model; the last stage's card names the GGUF's Hub id through the stages' cards."""
    from hf_align.cli import main

    out = tmp_path / "allo"
    argv = ["pipeline", "--config", str(Path(__file__).resolve().parents[1] / "recipes/allo/pipeline_testbed.yaml")]
    argv += ["--output_dir", str(out), "--model_name_or_path", str(files["plain"]), "--no_launch"]
    for item in ("max_steps=1", "per_device_train_batch_size=2", "bf16=false", "use_cpu=true", "report_to=none",
                 "gradient_checkpointing=false", "max_length=64", "disable_tqdm=true", "save_strategy=no",
                 "warmup_steps=0", "dataloader_num_workers=0", "plots=false"):  # fmt: skip
        argv += ["--set", item]
    assert main(argv) == 0
    assert "`tiny.F32.gguf`" in (out / "forget" / "README.md").read_text()
    assert "base_model: org/tiny-gguf" in (out / "improve" / "README.md").read_text()


def test_a_converted_folder_keeps_the_gguf_hub_id(tmp_path, files):
    """convert_gguf's card states the header's Hub id, so a model trained from the folder names it too."""
    from hf_align.hub import hub_id
    from hf_align.loading import convert_gguf

    assert hub_id(str(convert_gguf(files["plain"], tmp_path / "with", dtype="float32"))) == "org/tiny-gguf"
    assert hub_id(str(convert_gguf(files["q8"], tmp_path / "without", dtype="float32"))) is None


def test_a_bad_gguf_is_one_line_at_every_other_entry_point(tmp_path, files, monkeypatch):
    """adaptive-merge, a TRL command's trainer and eval: the damaged file named, before any model is loaded."""
    import hf_align.loading
    from hf_align.cli.evaluate import main as eval_main
    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer
    from hf_align.trainers.trl_commands import WarmupDPOConfig, WarmupDPOTrainer

    monkeypatch.setattr(hf_align.loading, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    monkeypatch.setattr(hf_align.loading, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
    bad = str(files["bad"])
    attempts = [
        lambda: AdaptiveMergeTrainer(
            str(files["plain"]),
            base_model=bad,
            args=AdaptiveMergeConfig(**quiet_training_args(output_dir=str(tmp_path / "a"))),
        ),  # fmt: skip
        lambda: WarmupDPOTrainer(
            str(files["plain"]),
            ref_model=bad,
            args=WarmupDPOConfig(**quiet_training_args(output_dir=str(tmp_path / "w"))),
        ),  # fmt: skip
        lambda: eval_main(
            [
                "--model_name_or_path",
                bad,
                "--dataset_name",
                "testbed:prompts",
                "--reward",
                "testbed",
                "--output_file",
                str(tmp_path / "e.json"),
            ]
        ),  # fmt: skip
    ]
    for attempt in attempts:
        with pytest.raises(UserError) as info:
            attempt()
        assert bad in str(info.value) and "truncated or damaged" in str(info.value) and "\n" not in str(info.value)


def test_mask_accumulation_takes_a_gguf_init_path(tmp_path, files):
    """weight_diff scores against a GGUF θ_start equal |θ − θ_testbed|; the conversion lands in the run's snapshot
    folder once (a resume reuses it); a bad file is refused when the callback is built, before any training."""
    from types import SimpleNamespace

    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.callbacks.mask_accumulation import INIT_SNAPSHOT_DIR
    from hf_align.testbed import load

    model = load().model
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    callback = MaskAccumulationCallback(method="weight_diff", granularity="element", init_path=str(files["plain"]))
    args = SimpleNamespace(output_dir=str(tmp_path / "run"), disable_tqdm=True, max_grad_norm=1.0)
    callback.on_train_begin(args, SimpleNamespace(global_step=0, is_world_process_zero=True), None, model=model)
    scores = callback.scores(model)
    trained = dict(model.named_parameters())
    for name, score in scores.items():
        torch.testing.assert_close(score, (trained[name].detach() - TESTBED[name]).abs(), rtol=0, atol=0)
    snapshot = tmp_path / "run" / INIT_SNAPSHOT_DIR / "model.safetensors"
    written = snapshot.stat().st_mtime_ns
    again = MaskAccumulationCallback(method="weight_diff", granularity="element", init_path=str(files["plain"]))
    again.on_train_begin(args, SimpleNamespace(global_step=2, is_world_process_zero=True), None, model=model)
    assert snapshot.stat().st_mtime_ns == written
    assert again._meta(SimpleNamespace(global_step=2))["init_path"] == "org/tiny-gguf"  # the header's Hub id
    with pytest.raises(UserError, match="bad.gguf: not a readable GGUF"):
        MaskAccumulationCallback(method="weight_diff", init_path=str(files["bad"]))


def test_the_ama_callback_converts_a_gguf_base_once_per_run(tmp_path, files, monkeypatch):
    """Three merges (two checkpoints and the end) against a GGUF base: one conversion, removed at train end; every
    merge averages with the testbed's weights; a bad base is refused when the callback is built."""
    from transformers import Trainer, TrainingArguments

    import hf_align.loading
    from hf_align.callbacks import AMAMergeCallback
    from hf_align.testbed import load

    conversions = []
    convert = hf_align.loading.convert_gguf
    monkeypatch.setattr(hf_align.loading, "convert_gguf", lambda *a, **k: conversions.append(a) or convert(*a, **k))
    before = _leftovers()
    tb = load()
    callback = AMAMergeCallback(str(files["plain"]), alpha=0.5)
    ids = tb.tokenizer(["1+2=3"] * 4)["input_ids"]
    args = TrainingArguments(**quiet_training_args(
        output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, save_strategy="steps", learning_rate=1e-2,
        per_device_train_batch_size=2,
    ))  # fmt: skip
    trainer = Trainer(tb.model, args, train_dataset=[{"input_ids": i, "labels": i} for i in ids], callbacks=[callback])
    trainer.train()
    assert len(callback.merged_dirs) == 3 and len(conversions) == 1
    assert _leftovers() == before
    trained = {k: v.detach() for k, v in tb.model.state_dict().items()}
    merged = load_file(tmp_path / "run" / "ama_merged" / "model.safetensors")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.5 * TESTBED[name] + 0.5 * trained[name], rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="bad.gguf: not a readable GGUF"):
        AMAMergeCallback(str(files["bad"]), alpha=0.5)
