"""Merges of tied embeddings (one tensor for the token embedding and lm_head): merged once, in the block the user
named, and the plan/card say which; adaptive merge learns that tensor's α (or says it did not)."""

import copy
import itertools
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from hf_align.merging import merge_models, partwise_plan
from hf_align.merging.adaptive import LearnedAlphas, adaptive_plan


NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.norm.weight"]  # fmt: skip
PARTS, EMBED, HEAD = "0.5|0.1", 0.7, 0.3  # first part 0.5, last part 0.1


def _expected_tied_alpha(tied_block, embed_alpha, head_alpha):
    """The rule written out: the named block; else the one α that was given; else the embedding block."""
    block = tied_block or ("head" if head_alpha is not None and embed_alpha is None else "embed")
    if block == "embed":
        return embed_alpha if embed_alpha is not None else 0.5
    return head_alpha if head_alpha is not None else 0.1


@pytest.mark.parametrize("stored_head", [False, True], ids=["head-not-stored", "head-stored"])
@pytest.mark.parametrize(
    "tied_block,embed_alpha,head_alpha", list(itertools.product([None, "embed", "head"], [None, EMBED], [None, HEAD]))
)
def test_partwise_tied_tensor_takes_the_named_blocks_alpha(tied_block, embed_alpha, head_alpha, stored_head):
    names = NAMES + (["lm_head.weight"] if stored_head else [])
    plan = partwise_plan(names, "0", PARTS, embed_alpha=embed_alpha, head_alpha=head_alpha,
                         tie_word_embeddings=True, tied_block=tied_block)  # fmt: skip
    expected = _expected_tied_alpha(tied_block, embed_alpha, head_alpha)
    assert plan["model.embed_tokens.weight"] == expected
    if stored_head:  # the stored copy of the one tensor gets the same α: merged once
        assert plan["lm_head.weight"] == expected
    assert plan["model.norm.weight"] == (head_alpha if head_alpha is not None else 0.1)
    block = "head" if expected == (head_alpha if head_alpha is not None else 0.1) and tied_block != "embed" else None
    group = plan.groups["model.embed_tokens.weight"]
    assert ("tied" in group) and ("lm_head" in group.split(" (")[0] if block == "head" else "embeddings" in group)
    assert "tied embeddings merged once" in plan.description


@pytest.mark.parametrize("tied_block", [None, "embed", "head"])
def test_untied_partwise_plan_is_unchanged_by_the_tied_rule(tied_block):
    plan = partwise_plan([*NAMES, "lm_head.weight"], "0", PARTS, embed_alpha=EMBED, head_alpha=HEAD,
                         tied_block=tied_block)  # fmt: skip
    assert plan["model.embed_tokens.weight"] == EMBED and plan["lm_head.weight"] == HEAD
    assert "tied" not in plan.description


def test_bad_tied_block_is_refused():
    with pytest.raises(ValueError, match="tied_block"):
        partwise_plan(NAMES, "0", PARTS, tie_word_embeddings=True, tied_block="lm_head")


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    """A tiny tied-embedding Llama (base) and an 'aligned' copy that changed some embedding rows and one layer."""
    from hf_align.testbed import load_random_tiny, load_tokenizer

    root = tmp_path_factory.mktemp("tied")
    base = load_random_tiny("llama", hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, tie_word_embeddings=True)  # fmt: skip
    assert base.lm_head.weight is base.model.embed_tokens.weight
    aligned = copy.deepcopy(base)
    torch.manual_seed(1)
    with torch.no_grad():
        aligned.model.embed_tokens.weight[5:40].add_(torch.randn(35, 32))
        for p in aligned.model.layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base.save_pretrained(root / "base")
    aligned.save_pretrained(root / "aligned")
    tokenizer = load_tokenizer()
    tokenizer.save_pretrained(root / "aligned")
    assert "lm_head.weight" not in load_file(root / "aligned" / "model.safetensors")
    return root / "base", root / "aligned"


def _embedding(folder):
    return load_file(folder / "model.safetensors")["model.embed_tokens.weight"]


@pytest.mark.parametrize("tied_block,expected", [("head", HEAD), ("embed", EMBED), (None, EMBED)])
def test_tied_merge_end_to_end_writes_the_named_blocks_alpha_and_card_says_which(
    tied_pair, tmp_path, tied_block, expected
):
    base, aligned = tied_pair

    def build(names, config):
        return partwise_plan(names, "1", PARTS, embed_alpha=EMBED, head_alpha=HEAD,
                             tie_word_embeddings=config["tie_word_embeddings"], tied_block=tied_block)  # fmt: skip

    merge_models(base, aligned, tmp_path / "out", plan=build, progress=False)
    formula = expected * _embedding(base).double() + (1 - expected) * _embedding(aligned).double()
    torch.testing.assert_close(_embedding(tmp_path / "out").double(), formula, rtol=0, atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"tied embeddings merged once with {'head' if tied_block == 'head' else 'embed'}_alpha" in card


def test_head_alpha_alone_applies_to_the_tied_tensor(tied_pair, tmp_path):
    """Fails on the old rule: a tied model's only head tensor silently took the first part's α."""
    base, aligned = tied_pair
    merge_models(base, aligned, tmp_path / "out", plan=lambda names, config: partwise_plan(
        names, "1", PARTS, head_alpha=HEAD, tie_word_embeddings=True), progress=False)  # fmt: skip
    formula = HEAD * _embedding(base).double() + (1 - HEAD) * _embedding(aligned).double()
    torch.testing.assert_close(_embedding(tmp_path / "out").double(), formula, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ adaptive


def _trainer(tied_pair, tmp_path, **overrides):
    from hf_align import testbed
    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer

    base, aligned = tied_pair
    args = dict(
        output_dir=str(tmp_path / "ama"), max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, learning_rate=1.0, reg_alpha=0.0,
    )  # fmt: skip
    config = AdaptiveMergeConfig(**{**args, **overrides})
    return AdaptiveMergeTrainer(str(aligned), base_model=str(base), args=config, train_dataset=testbed.sft_dataset(8))


def test_adaptive_merge_of_tied_embeddings_learns_the_tensor_in_the_head_block(tied_pair, tmp_path, tokenizer):
    """Fails on the old code: the merged embedding was exactly the base's while the output said 'head 0.2'."""
    from transformers import AutoModelForCausalLM

    base, aligned = tied_pair
    trainer = _trainer(tied_pair, tmp_path)
    trainer.train()
    learned = trainer.learned_alphas()
    assert learned.tied_embedding == "model.embed_tokens" and learned.tied_block == "head"
    assert "lm_head" not in learned.unmoved()
    result = trainer.merge(tmp_path / "merged", progress=False)
    alpha = learned.head_alpha
    formula = alpha * _embedding(base).double() + (1 - alpha) * _embedding(aligned).double()
    merged_embedding = _embedding(tmp_path / "merged").double()
    torch.testing.assert_close(merged_embedding, formula, rtol=0, atol=1e-6)
    assert not torch.equal(merged_embedding, _embedding(base).double())
    assert result.plan.groups["model.embed_tokens.weight"] == "lm_head (tied embeddings)"
    assert "tied embeddings merged once in the head block" in (tmp_path / "merged" / "README.md").read_text()
    # the merged model is the model the trainer optimised (the embedding lookup used the head's α too)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = tokenizer(["12+34=46", "rev 381=183"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, trainer.model(**ids).logits, rtol=1e-4, atol=1e-4)


def test_adaptive_merge_tied_in_the_embed_block_learns_no_head_alpha(tied_pair, tmp_path):
    trainer = _trainer(tied_pair, tmp_path, tied_block="embed", max_steps=1)
    trainer.train()
    learned = trainer.learned_alphas()
    assert not learned.head_learned and "lm_head" not in json.dumps(learned.modules)
    plan = adaptive_plan(learned, ["model.embed_tokens.weight", "model.norm.weight"])
    assert plan["model.embed_tokens.weight"] == 1.0  # non_linear_alpha: the base, as the reference does
    assert "lm_head: not learned (tied to the embeddings" in plan.description


def _learned(block_params, head_param, modules=None):
    return LearnedAlphas(init_val=0.2, epsilon=0.2, mask_level="block2", num_layers=4, block_params=block_params,
                         head_param=head_param, modules=modules or {"model.layers.0.mlp.up_proj": 0, "lm_head": None})  # fmt: skip


START = float(torch.tensor(-1.3862943611198906, dtype=torch.float32))  # logit(0.2) in float32, as trained


@pytest.mark.parametrize(
    "blocks,head,unmoved",
    [
        ([START, START], START, ["block 0", "block 1", "lm_head"]),
        ([START, 0.5], START, ["block 0", "lm_head"]),
        ([0.1, 0.5], START, ["lm_head"]),
        ([START, 0.5], 0.3, ["block 0"]),
        ([0.1, 0.5], 0.3, []),
    ],
)
def test_alphas_that_did_not_move_are_warned_once_and_not_reported_as_learned(blocks, head, unmoved, caplog):
    learned = _learned(blocks, head)
    assert learned.unmoved() == unmoved
    with caplog.at_level(logging.WARNING, logger="hf_align.merging.adaptive"):
        plan = adaptive_plan(learned, ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"])
    warnings = [r for r in caplog.records if "did not move" in r.getMessage()]
    assert len(warnings) == (1 if unmoved else 0)
    assert all(name in warnings[0].getMessage() for name in unmoved) if unmoved else True
    assert plan.description.count("(start value, not learned)") == len(unmoved)


def test_zero_learning_rate_warns_that_nothing_was_learned(tied_pair, tmp_path, caplog):
    trainer = _trainer(tied_pair, tmp_path, learning_rate=0.0, max_steps=1)
    trainer.train()
    with caplog.at_level(logging.WARNING, logger="hf_align.merging.adaptive"):
        result = trainer.merge(tmp_path / "merged", progress=False)
    assert sum("did not move" in r.getMessage() for r in caplog.records) == 1
    assert "lm_head: 0.2000 (start value, not learned)" in result.plan.description


# ------------------------------------------------------------------------------------------------ builder


@pytest.mark.parametrize(
    "config,names,tied",
    [
        ({"tie_word_embeddings": True}, NAMES, True),
        ({"tie_word_embeddings": True}, [*NAMES, "lm_head.weight"], True),
        ({"tie_word_embeddings": False}, [*NAMES, "lm_head.weight"], False),
        ({}, NAMES, True),  # no key: a token embedding and no stored head is a tied model
        ({}, [*NAMES, "lm_head.weight"], False),
    ],
)
def test_partwise_builder_reads_ties_from_the_checkpoint(config, names, tied):
    from hf_align.merging import partwise_builder

    plan = partwise_builder("0", PARTS, head_alpha=HEAD)(names, {"num_hidden_layers": 2, **config})
    assert plan["model.embed_tokens.weight"] == (HEAD if tied else 0.5)


def test_partwise_builder_refuses_a_bad_tied_block_at_once():
    from hf_align.merging import partwise_builder

    with pytest.raises(ValueError, match="tied_block"):
        partwise_builder("0", PARTS, tied_block="both")


def test_ama_merge_callback_with_the_builder_merges_the_tied_tensor_once(tied_pair, tmp_path):
    from hf_align.callbacks import AMAMergeCallback
    from hf_align.merging import partwise_builder

    base, aligned = tied_pair
    callback = AMAMergeCallback(str(base), plan=partwise_builder("1", PARTS, head_alpha=HEAD))
    callback.merge(aligned, tmp_path / "merged")
    formula = HEAD * _embedding(base).double() + (1 - HEAD) * _embedding(aligned).double()
    torch.testing.assert_close(_embedding(tmp_path / "merged").double(), formula, rtol=0, atol=1e-6)


def test_adaptive_merge_refuses_a_base_and_aligned_model_that_differ_in_tying(tied_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_align.errors import UserError
    from hf_align.merging.adaptive import wrap_for_adaptive_merge

    base, aligned = tied_pair
    untied = AutoModelForCausalLM.from_pretrained(base, tie_word_embeddings=False)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(UserError, match="tie_word_embeddings differs"):
        wrap_for_adaptive_merge(AutoModelForCausalLM.from_pretrained(aligned), untied, "block2", 0.2, 0.2, 1.0)


# ------------------------------------------------------------------------------------------------ command line


def test_cli_merge_takes_the_tied_block_and_plots_the_alphas(tied_pair, tmp_path, capsys):
    """`hf-align merge` builds its partwise plan with partwise_builder: --tied_block names the block (the old CLI had
    no such flag and read the tie from config.json only), --plot writes merge_alphas.png."""
    from hf_align.cli import main

    base, aligned = tied_pair
    out = tmp_path / "out"
    argv = ["merge", "--base_model_name_or_path", str(base), "--model_name_or_path", str(aligned),
            "--pivots", "1", "--alphas", PARTS, "--embed_alpha", str(EMBED), "--head_alpha", str(HEAD),
            "--tied_block", "head", "--plot", "--disable_tqdm", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    formula = HEAD * _embedding(base).double() + (1 - HEAD) * _embedding(aligned).double()
    torch.testing.assert_close(_embedding(out).double(), formula, rtol=0, atol=1e-6)
    assert (out / "merge_alphas.png").is_file()
    assert "tied embeddings merged once with head_alpha" in (out / "README.md").read_text()


def test_cli_merge_refuses_a_tied_block_for_a_linear_merge(tied_pair, tmp_path, capsys):
    from hf_align.cli import main

    base, aligned = tied_pair
    argv = ["merge", "--base_model_name_or_path", str(base), "--model_name_or_path", str(aligned), "--alpha", "0.5",
            "--tied_block", "head", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hf-align merge: --tied_block is for partwise merges (--alphas): a linear merge gives every tensor "
                   "one α."]  # fmt: skip
    assert not (tmp_path / "out").exists()
