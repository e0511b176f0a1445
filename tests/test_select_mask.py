"""Selection from scores, `hf-align select-mask` (both modes), plots, and warm-up → MaskedDPO end to end."""

import copy

import pytest
import torch

from hf_align.io import save_tensors
from hf_align.masks import NeuronMask
from hf_align.scores import load_scores, save_scores, weight_diff_scores
from hf_align.scripts.select_mask import format_summary, module_type, selection_threshold
from hf_align.testbed import quiet_training_args


def _checkpoints(tmp_path, model):
    """An 'init' and a 'trained' checkpoint of ``model`` whose difference we know entry by entry."""
    torch.manual_seed(0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: torch.randn_like(p) for n, p in init.items()}
    save_tensors(tmp_path / "init" / "model.safetensors", init)
    save_tensors(tmp_path / "trained" / "model.safetensors", {n: init[n] + delta[n] for n in init})
    return init, delta


def test_weight_diff_scores_stream_two_checkpoints(tmp_path, tiny_model):
    _, delta = _checkpoints(tmp_path, tiny_model)
    scores = weight_diff_scores(tmp_path / "init", tmp_path / "trained", granularity="element")
    assert set(scores) == set(delta)
    for name, d in delta.items():
        torch.testing.assert_close(scores[name], d.abs(), rtol=1e-6, atol=1e-6)
    rows = weight_diff_scores(tmp_path / "init", tmp_path / "trained", granularity="row", target=r"q_proj")
    assert all("q_proj" in n for n in rows)
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(rows[name], delta[name].abs().sum(1), rtol=1e-5, atol=1e-5)


def test_weight_diff_scores_errors_name_the_problem(tmp_path, tiny_model):
    init, _ = _checkpoints(tmp_path, tiny_model)
    save_tensors(tmp_path / "partial.safetensors", {"model.norm.weight": init["model.norm.weight"]})
    with pytest.raises(ValueError, match="is missing from the initial checkpoint"):
        weight_diff_scores(tmp_path / "partial.safetensors", tmp_path / "trained")
    save_tensors(tmp_path / "other.safetensors", {**init, "model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape"):
        weight_diff_scores(tmp_path / "other.safetensors", tmp_path / "trained")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        weight_diff_scores(tmp_path / "nowhere", tmp_path / "trained")


def test_summary_and_threshold():
    masks = {
        "model.layers.0.mlp.down_proj.weight": torch.tensor([1, 0, 0, 1]),
        "model.layers.1.mlp.down_proj.weight": torch.tensor([0, 0, 0, 1]),
        "model.norm.weight": torch.tensor([0, 0]),
    }
    text = format_summary(NeuronMask(masks))  # row lengths unknown: no params column
    assert "params" not in text
    assert "down_proj" in text and "3" in text and "0.3750" in text
    assert module_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    scores = {k: torch.arange(float(v.numel())) + i for i, (k, v) in enumerate(masks.items())}
    assert selection_threshold(scores, masks) == 0.0  # smallest selected score (layer 0, row 0)


def test_heatmap_and_distribution_pngs(tmp_path):
    from hf_align.plots import plot_score_distribution, plot_selection_heatmap

    fractions = {(0, "q_proj"): 0.1, (0, "down_proj"): 0.3, (1, "q_proj"): 0.0, (None, "lm_head"): 0.05}
    heat = plot_selection_heatmap(fractions, tmp_path / "heat.png")
    dist = plot_score_distribution({"a": torch.rand(1000), "b": torch.zeros(10)}, tmp_path / "d.png", threshold=0.5)
    for path in (heat, dist):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="NeuronMask"):
        plot_selection_heatmap({}, tmp_path / "empty.png")


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from hf_align.cli import main

    out = ["--output_dir", str(tmp_path / "o")]
    assert main(["select-mask", "--init", "a", "--neuron_mask_ratio", "0.1", *out]) == 2
    assert "--trained" in capsys.readouterr().err
    assert main(["select-mask", "--neuron_scores_path", "a", "--neuron_mask_ratio", "1.5", *out]) == 2
    assert "neuron_mask_ratio" in capsys.readouterr().err
    assert (
        main(["select-mask", "--neuron_scores_path", str(tmp_path / "none"), "--neuron_mask_ratio", "0.1", *out]) == 2
    )
    assert "neuron_scores.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_mask_from_scores_hits_the_ratio_exactly_with_ties(scope):
    from hf_align.masks import NeuronMask

    scores = {"a.weight": torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5] * 4), "b.weight": torch.ones(10)}  # many ties
    total = sum(s.numel() for s in scores.values())
    for ratio in (0.1, 0.3, 0.5):
        first = NeuronMask.from_scores(scores, ratio, scope=scope)
        again = NeuronMask.from_scores(scores, ratio, scope=scope)
        chosen = sum(int(m.bool().sum()) for m in first.masks.values())
        expected = (
            round(ratio * total) if scope == "global" else sum(round(ratio * s.numel()) for s in scores.values())
        )
        assert chosen == expected
        assert all(torch.equal(first.masks[k].bool(), again.masks[k].bool()) for k in scores)  # deterministic ties


def test_cli_from_scores_with_plots(tmp_path, capsys):
    from hf_align.cli import main
    from hf_align.masks import NeuronMask

    torch.manual_seed(0)
    scores = {f"model.layers.{i}.mlp.{m}.weight": torch.rand(8) for i in range(2) for m in ("up_proj", "down_proj")}
    save_scores(tmp_path / "warm", scores, {"method": "gradient"})
    argv = ["select-mask", "--scores", str(tmp_path / "warm"), "--ratio", "0.25", "--output", str(tmp_path / "m")]
    assert main([*argv, "--plot"]) == 0
    out = capsys.readouterr().out
    assert "up_proj" in out and "down_proj" in out
    mask = NeuronMask.load(tmp_path / "m")
    assert sum(int(m.bool().sum()) for m in mask.masks.values()) == 8
    everything = torch.cat([scores[k] for k in sorted(scores)])
    picked = torch.cat([scores[k][mask.masks[k].bool()] for k in sorted(scores)])
    assert picked.min() >= everything.topk(8).values.min()  # the top 8 scores, globally
    for png in ("selection_heatmap.png", "score_distribution.png"):
        assert (tmp_path / "m" / png).stat().st_size > 1000


def test_cli_init_trained_is_allos_recipe(tmp_path, tiny_model):
    from hf_align.cli import main
    from hf_align.masks import NeuronMask

    _, delta = _checkpoints(tmp_path, tiny_model)
    argv = ["select-mask", "--init", str(tmp_path / "init"), "--trained", str(tmp_path / "trained")]
    assert main([*argv, "--ratio", "0.05", "--exclude-top", "0.01", "--output", str(tmp_path / "m")]) == 0
    mask = NeuronMask.load(tmp_path / "m")
    # By hand: one global ranking of |Δ| over every entry; skip the top 1 %, keep the next 5 %.
    flat = torch.cat([delta[n].abs().flatten() for n in sorted(delta)])
    order = flat.argsort(descending=True, stable=True)
    skip, keep = round(0.01 * flat.numel()), round(0.05 * flat.numel())
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[order[skip : skip + keep]] = True
    got = torch.cat([mask.masks[n].bool().flatten() for n in sorted(delta)])
    assert int(got.sum()) == keep
    assert torch.equal(got, expected)
    assert load_scores(tmp_path / "m")[1]["method"] == "weight_diff"


def test_warmup_dpo_then_masked_dpo_end_to_end(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from hf_align import testbed
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.masks import NeuronMask
    from hf_align.trainers.masked_dpo import MaskedDPOConfig, MaskedDPOTrainer

    tb = testbed.load()
    data = tb.preference_dataset(8, seed=0)
    common = quiet_training_args(
        max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, max_length=64,
        bf16=True,  # TRL's default, as before quiet_training_args
    )  # fmt: skip
    warm = MaskAccumulationCallback(method="gradient", granularity="row", select_ratio=0.1)
    model = copy.deepcopy(tb.model)
    DPOTrainer(
        model=model, ref_model=copy.deepcopy(tb.model), args=DPOConfig(output_dir=str(tmp_path / "warm"), **common),
        train_dataset=data, processing_class=tb.tokenizer, callbacks=[warm],
    ).train()  # fmt: skip
    scores, meta = load_scores(tmp_path / "warm")
    assert meta["num_steps"] == 2 and scores["model.layers.0.self_attn.q_proj.weight"].sum() > 0
    mask = NeuronMask.load(tmp_path / "warm" / "neuron_mask")
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.bool().sum()) for m in mask.masks.values()) == round(0.1 * total)

    policy = copy.deepcopy(tb.model)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    args = MaskedDPOConfig(
        output_dir=str(tmp_path / "masked"), neuron_mask_path=str(tmp_path / "warm" / "neuron_mask"), **common
    )
    trainer = MaskedDPOTrainer(model=policy, args=args, train_dataset=data, processing_class=tb.tokenizer)
    trainer.train()
    from hf_align.sparse_update import merged_state_dict

    after = merged_state_dict(trainer.model)
    changed_outside = 0
    changed_inside = 0
    for name, m in mask.masks.items():
        moved = (after[name].detach() - before[name]).abs()
        moved = moved.reshape(moved.shape[0], -1).amax(1) if m.dim() == 1 and moved.dim() > 1 else moved
        changed_outside += int((moved[~m.bool()] > 0).sum())
        changed_inside += int((moved[m.bool()] > 0).sum())
    assert changed_outside == 0 and changed_inside > 0
