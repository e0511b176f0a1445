"""Adaptive AMA: the α formula, the L1 penalty, the on-the-fly interpolation, learning on data, saving, merging."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_align.merging.adaptive import InterpolatedLinear, LearnedAlphas, block_assignment, normalized_alphas
from hf_align.testbed import quiet_training_args
from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer


def _args(tmp_path, **overrides):
    base = quiet_training_args(
        output_dir=str(tmp_path / "ama"), max_steps=1, per_device_train_batch_size=4,
        logging_steps=1,
    )  # fmt: skip
    return AdaptiveMergeConfig(**{**base, **overrides})


def test_block_assignment_matches_the_reference_rule():
    assert block_assignment(6, "block3") == [0, 0, 1, 1, 2, 2]
    assert block_assignment(26, "block3") == [0] * 8 + [1] * 8 + [2] * 10  # ⌊26/3⌋ = 8, last takes the rest
    assert block_assignment(4, "layerwise") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="mask_level"):
        block_assignment(6, "blocks")
    with pytest.raises(ValueError, match="only 2 layers"):
        block_assignment(2, "block3")


def test_normalized_alphas_formula_and_epsilon():
    s = torch.tensor([-2.0, 0.5, 3.0])
    head = torch.tensor(1.0)
    for eps in (0.0, 0.2, 5.0):
        blocks, h = normalized_alphas(s, head, 0.2, eps)
        denom = sum(1 / (1 + math.exp(-v)) + eps for v in s.tolist())
        expected = [0.2 * (1 / (1 + math.exp(-v)) + eps) / denom * 3 for v in s.tolist()]
        torch.testing.assert_close(blocks, torch.tensor(expected))
        torch.testing.assert_close(h, torch.tensor(0.2 * (1 / (1 + math.exp(-1.0)) + eps) / denom * 3))
        assert float(blocks.mean()) == pytest.approx(0.2)  # the mean stays init_val
    spreads = [float(normalized_alphas(s, head, 0.2, eps)[0].std()) for eps in (0.0, 0.2, 5.0)]
    assert spreads[0] > spreads[1] > spreads[2]  # ε limits the spread
    blocks, h = normalized_alphas(torch.full((3,), math.log(0.2 / 0.8)), torch.tensor(math.log(0.2 / 0.8)), 0.2, 0.2)
    torch.testing.assert_close(blocks, torch.full((3,), 0.2))  # at init every α is init_val
    torch.testing.assert_close(h, torch.tensor(0.2))


def test_interpolated_linear_holds_references_and_matches_the_formula(tiny_model, tmp_path, tokenizer):
    base = copy.deepcopy(tiny_model)
    for p in tiny_model.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    aligned_q = tiny_model.model.layers[3].self_attn.q_proj.weight.clone()
    base_q = base.model.layers[3].self_attn.q_proj.weight
    trainer = AdaptiveMergeTrainer(tiny_model, base_model=base, args=_args(tmp_path), processing_class=tokenizer)
    module = tiny_model.model.layers[3].self_attn.q_proj
    assert isinstance(module, InterpolatedLinear) and module.block == 2
    assert module.base_weight.data_ptr() == base_q.data_ptr()  # no copy of θ0 ...
    with torch.no_grad():
        trainer.alphas.blocks.copy_(torch.tensor([0.3, -1.0, 2.0]))
    alpha = float(trainer.alphas()[0][2].detach())
    x = torch.randn(2, 5, aligned_q.shape[1])
    expected = F.linear(x, alpha * base_q + (1 - alpha) * aligned_q)
    torch.testing.assert_close(module(x), expected)
    assert [n for n, p in tiny_model.named_parameters() if p.requires_grad] == ["ama_alphas.blocks", "ama_alphas.head"]
    assert isinstance(tiny_model.lm_head, InterpolatedLinear) and tiny_model.lm_head.block is None
    # not-Linear tensors come from the base model (non_linear_alpha = 1, as in the reference)
    assert torch.equal(tiny_model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_regularizer_is_the_weighted_l1_sum_written_out(tiny_model, tmp_path, tokenizer):
    base = copy.deepcopy(tiny_model)
    for reg_type, center in (("l1", None), ("weighted", 1.0), ("weighted", None)):
        model = copy.deepcopy(tiny_model)
        args = _args(tmp_path, reg_type=reg_type, reg_center=center, reg_center_weight=25.0)
        trainer = AdaptiveMergeTrainer(model, base_model=copy.deepcopy(base), args=args, processing_class=tokenizer)
        with torch.no_grad():
            trainer.alphas.blocks.copy_(torch.tensor([0.5, -0.5, 1.5]))
            trainer.alphas.head.fill_(-1.0)
        blocks, head = trainer.alphas()
        c_center = 4 / 2 if center is None else center  # 4 layers: default centre L/2
        expected = 0.0
        for name, module in model.named_modules():
            if isinstance(module, InterpolatedLinear):
                layer = 4 if name == "lm_head" else int(name.split(".")[2])  # lm_head counts as layer L
                alpha = head if name == "lm_head" else blocks[min(layer // 1, 2)]
                c = 1.0 if reg_type == "l1" else 25.0 / (abs(layer - c_center) + 1)
                expected += c * abs(float(alpha) - 0.2)
        assert len([m for m in model.modules() if isinstance(m, InterpolatedLinear)]) == 4 * 7 + 1
        assert float(trainer.regularizer()) == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def destroyed_middle_block(tmp_path_factory):
    """θ0 = the pretrained testbed model; θ1 = θ0 with block 1 (layers 2–3 of 6) destroyed by noise."""
    from hf_align import testbed

    root = tmp_path_factory.mktemp("ama")
    tb = testbed.load()
    aligned = copy.deepcopy(tb.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in (2, 3):
            for p in aligned.model.layers[layer].parameters():
                if p.dim() == 2:
                    p.add_(torch.randn_like(p) * p.std() * 3)
    tb.model.save_pretrained(root / "base")
    aligned.save_pretrained(root / "aligned")
    tb.tokenizer.save_pretrained(root / "aligned")
    return root / "base", root / "aligned"


def test_alphas_move_towards_the_base_in_the_destroyed_block_then_merge(destroyed_middle_block, tmp_path, tokenizer):
    """The LM loss prefers α→1 (base) where θ1 is destroyed: that block's α rises, the others fall (mean fixed)."""
    from transformers import AutoModelForCausalLM

    from hf_align import testbed

    base, aligned = destroyed_middle_block
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=8, learning_rate=1.0, epsilon=0.0, reg_alpha=0.0)
    trainer = AdaptiveMergeTrainer(
        str(aligned), base_model=str(base), args=args, train_dataset=testbed.sft_dataset(24)
    )
    trainer.train()
    learned = trainer.learned_alphas()
    assert learned.block_alphas[1] > 0.3 and max(learned.block_alphas[0], learned.block_alphas[2]) < 0.15
    assert sum(learned.block_alphas) / 3 == pytest.approx(0.2)

    trainer.save_model()
    out = tmp_path / "ama"
    assert {"ama_alphas.safetensors", "ama_alphas.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin"))
    loaded = LearnedAlphas.load(out)
    assert loaded.block_alphas == pytest.approx(learned.block_alphas) and loaded.head_alpha == pytest.approx(
        learned.head_alpha
    )
    assert json.loads((out / "ama_alphas.json").read_text())["mask_level"] == "block3"

    # the streamed merge with the learned α's is the model the trainer optimised
    trainer.merge(tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = tokenizer(["12+34=46", "rev 381=183"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, trainer.model(**ids).logits, rtol=1e-4, atol=1e-4)
    plan = json.loads((tmp_path / "merged" / "merge_plan.json").read_text())["alphas"]
    assert plan["model.layers.2.mlp.up_proj.weight"] == pytest.approx(learned.block_alphas[1])
    assert plan["model.embed_tokens.weight"] == 1.0 and plan["lm_head.weight"] == pytest.approx(learned.head_alpha)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="init_val"):
        _args(tmp_path, init_val=1.0)
    with pytest.raises(ValueError, match="reg_type"):
        _args(tmp_path, reg_type="l2")
    with pytest.raises(ValueError, match="mask_level"):
        _args(tmp_path, mask_level="blockx")


def test_adaptive_merge_cli_runs_the_recipe_on_the_testbed(destroyed_middle_block, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_align.cli import main

    base, aligned = destroyed_middle_block
    argv = [
        "adaptive-merge", "--config", "recipes/ama/adaptive.yaml", "--model_name_or_path", str(aligned),
        "--base_model_name_or_path", "testbed", "--dataset_name", "testbed:sft", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--bf16", "false",
        "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(argv) == 0
    assert LearnedAlphas.load(tmp_path / "out").mask_level == "block3"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged") is not None


def test_merging_imports_no_higher_layer():
    """``merging/`` is core (DESIGN.md): no import of trainers, callbacks, cli or testbed, not even inside a function."""
    import ast
    from pathlib import Path

    import hf_align.merging

    forbidden = ("hf_align.trainers", "hf_align.callbacks", "hf_align.cli", "hf_align.testbed")
    found = []
    for path in Path(hf_align.merging.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.startswith(forbidden)]
    assert found == []
    assert not hasattr(hf_align.merging, "AdaptiveMergeTrainer")  # it moved to hf_align.trainers


def test_trainer_saves_json_args_and_no_pickle_in_checkpoints(tiny_model, tmp_path, tokenizer):
    """Checkpoints hold the α's and training_args.json (HFAlignTrainerMixin): no model weights, no training_args.bin."""
    from hf_align import testbed

    base = copy.deepcopy(tiny_model)
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = AdaptiveMergeTrainer(
        tiny_model, base_model=base, args=args, train_dataset=testbed.sft_dataset(8), processing_class=tokenizer
    )
    trainer.train()
    for checkpoint in (tmp_path / "ama" / "checkpoint-1", tmp_path / "ama" / "checkpoint-2"):
        names = {p.name for p in checkpoint.iterdir()}
        assert {"ama_alphas.safetensors", "ama_alphas.json", "training_args.json"} <= names
        assert "training_args.bin" not in names and not any(n.startswith("model") for n in names), names
    assert 0 < trainer.trainable_fraction < 1e-2


def test_config_is_a_trl_config_with_help_on_every_field(tmp_path):
    import dataclasses

    from trl.trainer.base_config import _BaseConfig

    args = _args(tmp_path)
    assert isinstance(args, _BaseConfig)
    assert [f.name for f in dataclasses.fields(AdaptiveMergeConfig) if not f.metadata.get("help")] == []
    assert args.bf16 is False and args.mask_level == "block3" and args.learning_rate == 2e-5  # kept defaults


def test_adaptive_merge_cli_says_in_one_line_that_no_alpha_moved(tmp_path, capsys, caplog):
    """At learning rate 0 the α's keep their start value: the printed α line marks each (not "learned") and the
    merge warns once, naming them."""
    import logging

    from hf_align.cli import main

    argv = [
        "adaptive-merge", "--config", "recipes/ama/adaptive.yaml", "--model_name_or_path", "testbed",
        "--base_model_name_or_path", "testbed", "--dataset_name", "testbed:sft", "--max_steps", "1",
        "--learning_rate", "0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--bf16", "false", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_align.merging.adaptive"):
        assert main(argv) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("α per block")]
    blocks = LearnedAlphas.load(tmp_path / "out").block_alphas
    assert line.count("(start value, not learned)") >= len(blocks) > 0
    (warning,) = [r.getMessage() for r in caplog.records if "did not move" in r.getMessage()]
    assert "block 0" in warning
