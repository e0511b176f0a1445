"""Every artifact kind goes to the Hub and comes back by repo id: pushed by what writes it, read back in a fresh
process with only what its card's quick start says (run as written), equal to what was pushed.

The Hub is :class:`hub_standin.LocalHub`: uploads land in a real ``huggingface_hub`` cache tree, and the readers use
``huggingface_hub``'s own download API on it (offline), so repo ids, revisions and file lists are the real ones.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_standin import LocalHub
from safetensors.torch import load_file

from hf_align import testbed
from hf_align.masks import NeuronMask
from hf_align.testbed import quiet_training_args


BASE = "org/tiny-base"
ROOT = Path(__file__).resolve().parents[1]

# What the fresh process writes after running a card's quick start, per artifact kind: the names its snippet
# defines, dumped as tensors (safetensors) or JSON.
DUMP = {
    "model": "_dump({k: v for k, v in model.state_dict().items()})",
    "mask": "_dump({k: v.to(torch.uint8) for k, v in mask.masks.items()})",
    "scores": "_dump(scores); _dump({k: v.to(torch.uint8) for k, v in mask.masks.items()}, 'mask')",
    "pool": "_json({'rows': pool.rows() if callable(pool.rows) else pool.rows, 'state': pool.state_dict()})",
}
PRELUDE = """
import json, sys, torch
from safetensors.torch import save_file
def _dump(tensors, name='out'):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, f'{sys.argv[1]}/{name}.safetensors')
def _json(value):
    open(f'{sys.argv[1]}/out.json', 'w').write(json.dumps(value, default=str))
"""


def quick_start(card: str) -> str:
    """The Python block under the card's "## Quick start" heading."""
    match = re.search(r"## Quick start\n\n```python\n(.*?)\n```", card, re.S)
    assert match, "the card has no quick start"
    return match.group(1)


def run_quick_start(hub: LocalHub, card: str, kind: str, tmp_path: Path, cwd: Path | None = None, dump=None) -> Path:
    """Run the card's quick start as written in a fresh process that sees only ``hub``; return its dump folder."""
    out = tmp_path / f"dump-{kind}-{len(list(tmp_path.glob('dump-*')))}"
    out.mkdir()
    script = quick_start(card) + "\n" + PRELUDE + (dump or DUMP[kind]) + "\n"
    env = {**hub.env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=cwd or tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"quick start failed:\n{script}\n{result.stderr[-3000:]}"
    return out


def assert_no_local_paths(hub: LocalHub, repo_id: str, *paths: Path) -> None:
    """No file of the repo (card, configs, JSON headers, weights) holds the writer's temp or home path."""
    needles = {str(p).encode() for p in paths} | {os.path.expanduser("~").encode() + b"/"}
    folder = hub.folder(repo_id)
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            data = file.read_bytes()
            found = [n.decode() for n in needles if n in data]
            assert not found, f"{repo_id}/{file.relative_to(folder)} holds the local path(s) {found}"


def assert_no_pickles_or_checkpoints(files: set[str]) -> None:
    stray = {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl")) or f.startswith(("checkpoint-", "_"))}
    assert not stray, f"uploaded: {sorted(stray)}"


def card_of(hub: LocalHub, repo_id: str) -> tuple[str, dict]:
    text = (hub.folder(repo_id) / "README.md").read_text()
    return text, yaml.safe_load(text.split("---")[1])


def equal_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> LocalHub:
    hub = LocalHub(tmp_path / "hub-cache").install(monkeypatch)
    hub.create_repo(BASE)
    hub.upload_folder(repo_id=BASE, folder_path=str(testbed.MODEL_DIR), commit_message="base")
    return hub


def _masked_dpo(tmp_path, repo: str, callbacks=None, **overrides):
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    tb = testbed.load()
    args = MaskedDPOConfig(**quiet_training_args(
        output_dir=str(tmp_path / repo.split("/")[1]), max_steps=1, per_device_train_batch_size=2,
        gradient_checkpointing=False, hub_model_id=repo, learning_rate=1e-2, lr_scheduler_type="cosine",
        **overrides,
    ))  # fmt: skip
    trainer = MaskedDPOTrainer(
        model=BASE,  # --model_name_or_path as a repo id, through the Hub cache
        args=args, train_dataset=tb.preference_dataset(4), processing_class=tb.tokenizer,
        neuron_mask=NeuronMask.random(tb.model, 0.1, "row", seed=0), callbacks=callbacks,
    )  # fmt: skip
    trainer.train()
    trainer.push_to_hub(dataset_name="org/preference-data")
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("save_merged", [True, False])
def test_a_trained_model_round_trips_merged_or_as_deltas(hub, tmp_path, save_merged):
    """~25 s each: the merged model, or the deltas + mask (the card names the base and says what it needs)."""
    repo = f"me/allo-{'merged' if save_merged else 'deltas'}"
    trainer = _masked_dpo(tmp_path, repo, save_merged=save_merged)
    files = hub.files(repo)
    card, meta = card_of(hub, repo)
    assert [r for r, _ in hub.repos] == [BASE, repo] and [u[0] for u in hub.uploads[1:]] == [repo] * (
        len(hub.uploads) - 1
    )
    assert_no_pickles_or_checkpoints(files)
    assert {
        "README.md",
        "training_args.json",
        "tokenizer.json",
        "config.json" if save_merged else "neuron_mask.json",
    } <= files
    assert meta["base_model"] == BASE and meta["datasets"] == ["org/preference-data"] and meta["model_name"]
    assert "| lr_scheduler_type | `cosine` |" in card and "SchedulerType" not in card
    assert "| beta | `0.1` |" in card and "Cite TRL as" in card and "### Framework versions" in card
    if save_merged:
        assert "model.safetensors" in files and "neuron_deltas.safetensors" not in files
        assert meta["library_name"] == "transformers"
        expected = load_file(Path(trainer.args.output_dir) / "model.safetensors")
    else:
        assert {"neuron_deltas.safetensors", "neuron_mask.safetensors"} <= files and "model.safetensors" not in files
        assert meta["library_name"] == "hf-align" and meta["base_model_relation"] == "adapter"
        assert "neuron-deltas" in meta["tags"] and "**Needs:**" in card and f"`{BASE}`" in card
        from transformers import AutoModelForCausalLM

        from hf_align.sparse_update import load_deltas

        local = load_deltas(AutoModelForCausalLM.from_pretrained(testbed.MODEL_DIR), trainer.args.output_dir)
        expected = local.state_dict()
    dumped = load_file(run_quick_start(hub, card, "model", tmp_path) / "out.safetensors")
    equal_tensors(dumped, {k: v for k, v in expected.items() if k in dumped})
    assert set(expected) <= set(dumped) | {"lm_head.weight"}  # tied weights are saved once
    assert_no_local_paths(hub, repo, tmp_path, testbed.MODEL_DIR)


@pytest.mark.slow
def test_an_aligner_adapter_round_trips_with_hf_aligns_card(hub, tmp_path):
    """TRL's SFTTrainer with an Aligner adapter, card adopted (what the CLI's aligner-sft does): hf-align's card,
    whose quick start loads the adapter on the base by repo id (TRL's card failed with KeyError 'ALIGNER')."""
    from trl import SFTConfig, SFTTrainer

    from hf_align.peft_tuners import AlignerConfig
    from hf_align.trainers.cards import adopt_card

    args = SFTConfig(**quiet_training_args(
        output_dir=str(tmp_path / "aligner"), max_steps=1, per_device_train_batch_size=2, hub_model_id="me/aligner",
        gradient_checkpointing=False, learning_rate=1e-2,
    ))  # fmt: skip
    peft_config = AlignerConfig(num_tokens=2, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=BASE, args=args, train_dataset=testbed.sft_dataset(4), peft_config=peft_config,
                         processing_class=testbed.load_tokenizer())  # fmt: skip
    adopt_card(trainer)
    trainer.train()
    trainer.push_to_hub(dataset_name="org/sft-data")
    card, meta = card_of(hub, "me/aligner")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= hub.files("me/aligner")
    assert [r for r, _ in hub.repos] == [BASE, "me/aligner"]
    assert meta["base_model"] == BASE and "aligner" in meta["tags"] and "2312.05503" in card
    adapter = {k: v for k, v in load_file(hub.folder("me/aligner") / "adapter_model.safetensors").items()}
    dump = "_dump({k: v for k, v in model.state_dict().items() if 'aligner' in k})"
    out = run_quick_start(hub, card, "model", tmp_path, dump=dump)
    dumped = load_file(out / "out.safetensors")
    assert len(dumped) == len(adapter) > 0
    for (_, got), (_, saved) in zip(sorted(dumped.items()), sorted(adapter.items())):
        torch.testing.assert_close(got, saved, rtol=0, atol=0)
    # transformers' pickled training_args.bin (holding output_dir) is the CLI's to replace (issue #28.11)
    (hub.folder("me/aligner") / "training_args.bin").unlink()
    assert_no_local_paths(hub, "me/aligner", tmp_path, testbed.MODEL_DIR)


def test_a_mask_round_trips_with_revisions_and_subfolders(hub, tmp_path):
    from hf_align.artifacts import push_artifact
    from hf_align.hub import push_neuron_mask

    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    first, second = (NeuronMask.random(model, r, "row", seed=s) for r, s in ((0.1, 0), (0.3, 1)))
    push_neuron_mask(first, "me/mask", base_model=BASE)
    first_commit = hub.commit("me/mask")
    push_neuron_mask(second, "me/mask", base_model=BASE)
    assert hub.files("me/mask") == {"README.md", "neuron_mask.safetensors", "neuron_mask.json", "mask_plot.png"}
    card, meta = card_of(hub, "me/mask")
    assert meta["library_name"] == "hf-align" and meta["base_model"] == BASE
    dumped = load_file(run_quick_start(hub, card, "mask", tmp_path) / "out.safetensors")
    equal_tensors({k: v.bool() for k, v in dumped.items()}, second.masks)  # main: the latest upload
    from types import SimpleNamespace

    from hf_align.trainers._masking import resolve_neuron_mask

    flag = SimpleNamespace(neuron_mask_path=f"me/mask@{first_commit}", neuron_scores_path=None)  # --neuron_mask_path
    for old in (NeuronMask.load("me/mask", revision=first_commit), resolve_neuron_mask(None, flag)):
        equal_tensors(old.masks, first.masks)
    # an artifact in a subfolder of a repo: org/name/sub
    first.save(tmp_path / "run" / "neuron_mask")
    push_artifact(tmp_path / "run", "me/run")
    assert hub.files("me/run") == {"README.md", "neuron_mask/neuron_mask.json", "neuron_mask/neuron_mask.safetensors"}
    assert [r for r, _ in hub.repos] == [BASE, "me/mask", "me/mask", "me/run"]
    equal_tensors(NeuronMask.load("me/run/neuron_mask").masks, first.masks)
    assert_no_local_paths(hub, "me/mask", tmp_path)


def test_select_mask_pushes_its_base_model_and_no_local_path(hub, tmp_path):
    """`select-mask --push_to_hub` names the base the mask selects neurons of (the --init checkpoint, or the run the
    scores came from), and neither its card nor its JSON header holds the writer's paths."""
    import shutil

    from safetensors.torch import save_file

    from hf_align.cli import main
    from hf_align.hub import push_neuron_mask

    init = hub.folder(BASE)  # the base as the Hub cache holds it (a local folder a user passes as --init)
    trained = tmp_path / "trained"
    shutil.copytree(init, trained)
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in load_file(init / "model.safetensors").items()}
    save_file(weights, trained / "model.safetensors", metadata={"format": "pt"})
    flags = ["--neuron_mask_ratio", "0.1", "--output_dir"]
    argv = ["select-mask", "--init", str(init), "--trained", str(trained), *flags, str(tmp_path / "m1")]
    assert main([*argv, "--push_to_hub", "me/diff-mask"]) == 0
    assert card_of(hub, "me/diff-mask")[1]["base_model"] == BASE

    run = tmp_path / "warm"  # a warm-up run's folder: scores beside the trainer's card, which names the base
    save_scores_like_a_run(run, weights)
    argv = ["select-mask", "--neuron_scores_path", str(run), *flags, str(tmp_path / "m2")]
    assert main([*argv, "--push_to_hub", "me/score-mask"]) == 0
    assert card_of(hub, "me/score-mask")[1]["base_model"] == BASE
    from hf_align.artifacts import push_artifact

    push_artifact(run, "me/warm-scores")  # the scores by repo id: the base from the repo's card
    argv = ["select-mask", "--neuron_scores_path", "me/warm-scores", *flags, str(tmp_path / "m3")]
    assert main([*argv, "--push_to_hub", "me/hub-score-mask"]) == 0
    assert card_of(hub, "me/hub-score-mask")[1]["base_model"] == BASE

    push_neuron_mask(NeuronMask.from_weight_diff(init, trained, 0.1), "me/api-mask")  # the Python API alike
    assert card_of(hub, "me/api-mask")[1]["base_model"] == BASE
    for repo in ("me/diff-mask", "me/score-mask", "me/hub-score-mask", "me/api-mask"):
        assert_no_local_paths(hub, repo, tmp_path, hub.root)


def save_scores_like_a_run(folder: Path, weights: dict) -> None:
    from hf_align.hub import build_model_card
    from hf_align.scores import save_scores

    save_scores(folder, {k: v.abs().flatten() for k, v in weights.items() if v.dim() == 2}, {"method": "gradient"})
    build_model_card(title="warm-up", method="DPO warm-up", how_to_load="", base_model=BASE).save(folder / "README.md")


def test_a_weight_diff_run_pushes_its_scores_but_not_its_start_snapshot(hub, tmp_path):
    """The callback's θ_start snapshot is a copy of the model's weights kept for resuming: the run's push must not
    upload it, and the scores' header must not name the writer's folders."""
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.scores import load_scores

    _masked_dpo(tmp_path, "me/warm", callbacks=[MaskAccumulationCallback(method="weight_diff", granularity="row")])
    files = hub.files("me/warm")
    assert {"neuron_scores.safetensors", "neuron_scores.json"} <= files
    assert not [f for f in files if "init" in f.split("/")[0]], sorted(files)
    assert load_scores("me/warm")[1]["method"] == "weight_diff"
    assert_no_local_paths(hub, "me/warm", tmp_path)


def test_scores_and_a_data_pool_round_trip(hub, tmp_path):
    from hf_align.artifacts import push_artifact
    from hf_align.data_pool import DataPool
    from hf_align.scores import load_scores, save_scores

    scores = {"model.layers.0.mlp.up_proj.weight": torch.rand(8), "model.layers.1.mlp.up_proj.weight": torch.rand(8)}
    save_scores(tmp_path / "warm", scores, {"method": "gradient"})
    mask = NeuronMask({k: v > 0.5 for k, v in scores.items()})
    mask.save(tmp_path / "warm" / "neuron_mask")
    push_artifact(tmp_path / "warm", "me/scores", base_model=BASE)
    assert hub.files("me/scores") == {"README.md", "neuron_scores.safetensors", "neuron_scores.json",
                                      "neuron_mask/neuron_mask.json", "neuron_mask/neuron_mask.safetensors"}  # fmt: skip
    card, meta = card_of(hub, "me/scores")
    assert meta["library_name"] == "hf-align" and "neuron-scores" in meta["tags"]
    out = run_quick_start(hub, card, "scores", tmp_path)
    equal_tensors(load_file(out / "out.safetensors"), scores)
    equal_tensors({k: v.bool() for k, v in load_file(out / "mask.safetensors").items()}, mask.masks)
    assert load_scores("me/scores")[1]["method"] == "gradient"

    pool = DataPool(feedback_type="quantile", num_quantiles=2, seed=0)
    pool.add(["1+2=", "4+4="], ["3", "9"], scores=[1.0, 0.0])
    pool.save(tmp_path / "pool")
    push_artifact(tmp_path / "pool", "me/pool")
    assert hub.files("me/pool") == {"README.md", "pool.parquet", "pool.json"}
    card, _ = card_of(hub, "me/pool")
    dumped = json.loads((run_quick_start(hub, card, "pool", tmp_path) / "out.json").read_text())
    again = DataPool.load("me/pool")
    assert dumped["state"]["num_rows"] == 2 == len(again) and dumped["state"] == json.loads(
        json.dumps(again.state_dict(), default=str)
    )
    for repo in ("me/scores", "me/pool"):
        assert_no_local_paths(hub, repo, tmp_path)


@pytest.mark.slow
def test_a_merge_of_repo_ids_round_trips(hub, tmp_path, monkeypatch):
    """~20 s: `hf-align merge` reads both inputs by repo id and pushes the merged model with its card."""
    from hf_align.cli import main

    aligned = testbed.load().model
    with torch.no_grad():
        aligned.model.norm.weight.add_(1.0)
    aligned.save_pretrained(tmp_path / "aligned")
    testbed.load_tokenizer().save_pretrained(tmp_path / "aligned")
    hub.create_repo("me/aligned")
    hub.upload_folder(repo_id="me/aligned", folder_path=str(tmp_path / "aligned"))
    argv = ["merge", "--base_model_name_or_path", BASE, "--model_name_or_path", "me/aligned", "--alpha", "0.5"]
    assert main([*argv, "--output_dir", str(tmp_path / "merged"), "--no-progress", "--push_to_hub", "me/merged"]) == 0
    card, meta = card_of(hub, "me/merged")
    assert {"README.md", "config.json", "model.safetensors", "merge_plan.json", "tokenizer.json"} <= hub.files(
        "me/merged"
    )
    assert_no_pickles_or_checkpoints(hub.files("me/merged"))
    assert meta["base_model"] == ["me/aligned", BASE] and meta["base_model_relation"] == "merge"
    dumped = load_file(run_quick_start(hub, card, "model", tmp_path) / "out.safetensors")
    equal_tensors({k: v for k, v in load_file(tmp_path / "merged" / "model.safetensors").items()}, dumped)
    assert_no_local_paths(hub, "me/merged", tmp_path, testbed.MODEL_DIR)


def test_the_ama_callback_pushes_a_card_for_its_repo(hub, tmp_path):
    """AMAMergeCallback(push_to_hub=True): the merged model's card names the repo it lands in (its quick start runs
    as written from the Hub) and the base by Hub id; no file holds the writer's paths."""
    from hf_align.callbacks import AMAMergeCallback

    ama = AMAMergeCallback(BASE, alpha=0.5, merge_on="end", push_to_hub=True, hub_repo_id="me/ama")
    _masked_dpo(tmp_path, "me/policy", callbacks=[ama], push_to_hub=True)  # the run pushes: its id may be named
    card, meta = card_of(hub, "me/ama")
    assert BASE in meta["base_model"] and meta["base_model_relation"] == "merge"
    assert "me/policy" in card  # the aligned model: the run's Hub id, not its scratch folder
    dumped = load_file(run_quick_start(hub, card, "model", tmp_path) / "out.safetensors")
    equal_tensors(load_file(tmp_path / "policy" / "ama_merged" / "model.safetensors"), dumped)
    assert_no_local_paths(hub, "me/ama", tmp_path, testbed.MODEL_DIR)
    assert "ama_final" not in (tmp_path / "policy" / "ama_merged" / "README.md").read_text()  # the local card alike


def test_a_missing_repo_is_one_line_naming_it(hub):
    with pytest.raises(FileNotFoundError, match=r"neuron mask: 'me/nothing' does not exist locally, and Hub repo"):
        NeuronMask.load("me/nothing")
    with pytest.raises(FileNotFoundError, match=r"expected a folder with neuron_scores\.safetensors"):
        from hf_align.scores import load_scores

        load_scores("./no/such/folder")
