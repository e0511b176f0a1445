"""What a mask costs in weights (issue #29 point 4): ``budget="params"`` ranks rows counted by their length, and
every mask reports the fraction of *weights* it trains beside the fraction of rows (repr, header, select-mask, card).

On a real architecture rows differ in length (``down_proj``'s rows are ``intermediate_size`` long, the others
``hidden_size``) and the embedding is tied: a global 10 % of rows can train far more than 10 % of the weights.
The reference selection is written out here: sort every row by score (ties by name, then index), take rows until
their lengths reach the budget.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_align.errors import UserError
from hf_align.masks import MaskSelection, NeuronMask, neuron_sizes
from hf_align.testbed import load_random_tiny


@pytest.fixture(scope="module")
def model():
    # hidden 32, intermediate 96: gate/up/q/k/v/o rows are 32 long, down_proj's 96; tied embedding and head
    return load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=96, tie_word_embeddings=True)


def _row_scores(model, seed=0, down_boost=0.0):
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for name, param in model.named_parameters():
        if param.dim() == 2 and ".layers." in name:
            score = torch.rand(param.shape[0], generator=generator)
            scores[name] = score + (down_boost if "down_proj" in name else 0.0)
    return scores


def _reference(scores, sizes, ratio, exclude_top=0.0):
    """Rows by descending score (ties: names sorted, then index); skip the top exclude_top of the weights, then
    take rows until ratio of the weights is reached."""
    rows = sorted(
        ((float(s), name, i) for name in sorted(scores) for i, s in enumerate(scores[name].tolist())),
        key=lambda r: -r[0],
    )  # sorted() is stable: equal scores keep name/index order
    total = sum(scores[name].numel() * sizes[name] for name in scores)
    skip, keep = round(exclude_top * total), round(ratio * total)

    def first(budget):
        taken, used = set(), 0
        for _, name, i in rows:
            if used >= budget:
                break
            taken.add((name, i))
            used += sizes[name]
        return taken

    chosen = first(skip + keep) - first(skip) if skip else first(keep)
    return {name: torch.tensor([(name, i) in chosen for i in range(scores[name].numel())]) for name in scores}


def test_neuron_sizes_are_row_lengths(model):
    sizes = neuron_sizes(model)
    assert sizes["model.layers.0.mlp.down_proj.weight"] == 96
    assert sizes["model.layers.0.mlp.up_proj.weight"] == 32
    assert sizes["model.layers.1.self_attn.k_proj.weight"] == 32
    assert sizes["model.norm.weight"] == 1
    assert sizes["model.embed_tokens.weight"] == 32  # tied: one tensor, listed once


@pytest.mark.parametrize("exclude_top", [0.0, 0.05])
@pytest.mark.parametrize("ratio", [0.1, 0.37])
def test_params_budget_matches_the_written_out_selection(model, ratio, exclude_top):
    scores, sizes = _row_scores(model, seed=1, down_boost=0.3), neuron_sizes(model)
    mask = NeuronMask.from_scores(scores, MaskSelection(ratio, exclude_top=exclude_top, budget="params"),
                                  neuron_sizes=sizes)  # fmt: skip
    expected = _reference(scores, sizes, ratio, exclude_top)
    for name in scores:
        assert torch.equal(mask.masks[name], expected[name]), name
    longest = max(sizes[name] for name in scores)
    assert ratio <= mask.param_ratio < ratio + longest / mask.num_params_total  # reached, by less than a row


def test_neurons_budget_can_train_far_more_weights_and_says_so(model):
    """The issue's case: ranked by rows, long rows (down_proj) scored high take most of the 10 %."""
    scores, sizes = _row_scores(model, seed=2, down_boost=1.0), neuron_sizes(model)
    by_rows = NeuronMask.from_scores(scores, 0.1, neuron_sizes=sizes)
    by_params = NeuronMask.from_scores(scores, 0.1, budget="params", neuron_sizes=sizes)
    assert by_rows.ratio == pytest.approx(0.1, abs=1e-3)
    assert by_rows.param_ratio > 0.2  # every selected row is a 96-long down_proj row
    assert by_params.param_ratio == pytest.approx(0.1, abs=96 / by_params.num_params_total)
    assert by_params.ratio < by_rows.ratio
    assert f"params={by_rows.num_params_selected}/{by_rows.num_params_total}" in repr(by_rows)
    assert by_params.info["budget"] == "params" and by_rows.info["budget"] == "neurons"


def test_element_scores_count_the_same_in_either_budget(model):
    generator = torch.Generator().manual_seed(3)
    layer = [(n, p) for n, p in model.named_parameters() if ".layers.0." in n and p.dim() == 2]
    scores = {n: torch.rand(p.shape, generator=generator) for n, p in layer}
    a = NeuronMask.from_scores(scores, 0.2)
    b = NeuronMask.from_scores(scores, 0.2, budget="params")  # no sizes needed: one entry is one weight
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in scores)
    assert a.param_ratio == a.ratio


def test_a_row_budget_without_row_lengths_is_refused_by_name(model):
    scores = _row_scores(model)
    with pytest.raises(UserError, match="length of 'model.layers.0.mlp.down_proj.weight''s rows is unknown"):
        NeuronMask.from_scores(scores, 0.1, budget="params")
    with pytest.raises(UserError, match="MaskSelection.budget"):
        MaskSelection(0.1, budget="weights")


def test_the_weight_count_survives_save_and_load_and_reaches_the_card(model, tmp_path):
    from hf_align.hub import mask_summary

    mask = NeuronMask.from_scores(_row_scores(model), 0.1, budget="params", neuron_sizes=neuron_sizes(model))
    mask.save(tmp_path / "m")
    loaded = NeuronMask.load(tmp_path / "m")
    assert (loaded.num_params_selected, loaded.num_params_total) == (mask.num_params_selected, mask.num_params_total)
    card = "\n".join(mask_summary(loaded))
    assert f"weights trained: {mask.num_params_selected} of {mask.num_params_total}" in card
    assert "ratio counted in: params" in card
    header = json.loads((tmp_path / "m" / "neuron_mask.json").read_text())
    header["neuron_sizes"]["model.layers.0.mlp.down_proj.weight"] = 0
    (tmp_path / "m" / "neuron_mask.json").write_text(json.dumps(header))
    with pytest.raises(UserError, match="neuron_sizes must map"):
        NeuronMask.load(tmp_path / "m")


def test_a_mask_learns_its_row_lengths_from_the_model(model):
    """A row mask made from scores alone does not know its weights; checked on the model, it does."""
    mask = NeuronMask.from_scores(_row_scores(model), 0.1)
    assert mask.param_ratio is None and "params=" not in repr(mask)
    mask.validate(model)
    assert mask.param_ratio is not None and "params=" in repr(mask)
    random = NeuronMask.random(model, 0.1, "row", budget="params")
    assert random.param_ratio == pytest.approx(0.1, abs=96 / random.num_params_total)


def test_select_mask_from_checkpoints_by_params_reports_weights(model, tmp_path, capsys):
    from hf_align.cli import main

    model.save_pretrained(tmp_path / "init")
    trained = load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=96, tie_word_embeddings=True,
                               seed=1)  # fmt: skip
    trained.save_pretrained(tmp_path / "trained")
    out = tmp_path / "mask"
    argv = ["select-mask", "--init", str(tmp_path / "init"), "--trained", str(tmp_path / "trained"),
            "--neuron_mask_granularity", "row", "--neuron_mask_ratio", "0.1", "--neuron_mask_budget", "params",
            "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("module "))
    assert header.split()[-2:] == ["fraction", "params"]
    mask = NeuronMask.load(out)
    assert mask.info["budget"] == "params"
    assert mask.param_ratio == pytest.approx(0.1, abs=96 / mask.num_params_total)
    last = printed.strip().splitlines()
    all_line = next(line for line in last if line.startswith("all "))
    assert f"{mask.param_ratio:.4f}" in all_line
