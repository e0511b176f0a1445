"""NeuronMask against hand computations: selection, errors, bit-packed files, validation, weight-diff masks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_align import testbed
from hf_align.masks import MASK_FILE, MASK_META_FILE, NeuronMask


def _scores():
    # 7 element neurons: a = [[1, 5], [3, 2]], b = [4, 0, 6]
    return {"b": torch.tensor([4.0, 0.0, 6.0]), "a": torch.tensor([[1.0, 5.0], [3.0, 2.0]])}


def _as_lists(mask):
    return {name: m.int().tolist() for name, m in mask.masks.items()}


# ------------------------------------------------------------------------------------------------ selection
def test_global_top_bottom_and_band_by_hand():
    top = NeuronMask.from_scores(_scores(), 3 / 7)  # round(3) = 3: scores 6, 5, 4
    assert _as_lists(top) == {"a": [[0, 1], [0, 0]], "b": [1, 0, 1]}
    assert top.num_selected == 3 and top.ratio == pytest.approx(3 / 7)
    bottom = NeuronMask.from_scores(_scores(), 3 / 7, select="bottom")  # 0, 1, 2
    assert _as_lists(bottom) == {"a": [[1, 0], [0, 1]], "b": [0, 1, 0]}
    band = NeuronMask.from_scores(_scores(), 2 / 7, exclude_top=1 / 7)  # skip 6, keep 5 and 4
    assert _as_lists(band) == {"a": [[0, 1], [0, 0]], "b": [1, 0, 0]}
    band_bottom = NeuronMask.from_scores(_scores(), 2 / 7, exclude_top=1 / 7, select="bottom")  # skip 0: 1, 2
    assert _as_lists(band_bottom) == {"a": [[1, 0], [0, 1]], "b": [0, 0, 0]}


def test_tensor_scope_ranks_each_tensor_alone():
    mask = NeuronMask.from_scores(_scores(), 0.5, scope="tensor")
    # a: round(0.5 * 4) = 2 -> 5, 3;  b: round(0.5 * 3) = round(1.5) = 2 -> 6, 4
    assert _as_lists(mask) == {"a": [[0, 1], [1, 0]], "b": [1, 0, 1]}
    # the same ratio globally: round(3.5) = 4 -> 6, 5, 4, 3
    assert _as_lists(NeuronMask.from_scores(_scores(), 0.5)) == {"a": [[0, 1], [1, 0]], "b": [1, 0, 1]}
    # a case where they differ: ratio 0.25 -> global round(1.75) = 2 (6, 5); tensor: a 1 (5), b round(0.75) = 1 (6)
    glob = NeuronMask.from_scores(
        {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([7.0, 8.0, 9.0, 10.0])}, 2 / 7
    )
    tens = NeuronMask.from_scores(
        {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([7.0, 8.0, 9.0, 10.0])}, 0.34, scope="tensor"
    )
    assert _as_lists(glob) == {"a": [0, 0, 0], "b": [0, 0, 1, 1]}
    assert _as_lists(tens) == {"a": [0, 0, 1], "b": [0, 0, 0, 1]}


def test_row_scores_give_row_masks():
    mask = NeuronMask.from_scores({"w": torch.tensor([0.5, 3.0, 1.0, 2.0])}, 0.5)
    assert mask.masks["w"].tolist() == [False, True, False, True]
    assert mask.granularity == "row"
    assert mask.is_row("w", (4, 8)) and not mask.is_row("w", (4,))


def test_ties_are_deterministic_in_name_then_position_order():
    scores = {"z": torch.zeros(4), "a": torch.zeros(2, 2)}
    mask = NeuronMask.from_scores(scores, 3 / 8)  # round(3) = 3 tied entries: the first three of a, then z
    assert _as_lists(mask) == {"a": [[1, 1], [1, 0]], "z": [0, 0, 0, 0]}
    reordered = NeuronMask.from_scores(dict(reversed(list(scores.items()))), 3 / 8)
    assert _as_lists(reordered) == _as_lists(mask)
    tied_top = {"a": torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])}
    assert NeuronMask.from_scores(tied_top, 0.4).masks["a"].tolist() == [False, True, True, False, False]


def test_random_exact_count_seeded_and_seed_dependent():
    scores = {"a": torch.zeros(50, 20), "b": torch.zeros(300)}
    first = NeuronMask.from_scores(scores, 0.137, select="random", seed=3)
    again = NeuronMask.from_scores(scores, 0.137, select="random", seed=3)
    other = NeuronMask.from_scores(scores, 0.137, select="random", seed=4)
    assert first.num_selected == round(0.137 * 1300) == other.num_selected
    assert _as_lists(first) == _as_lists(again)
    assert _as_lists(first) != _as_lists(other)
    per_tensor = NeuronMask.from_scores(scores, 0.137, select="random", scope="tensor", seed=3)
    assert int(per_tensor.masks["a"].sum()) == round(0.137 * 1000)
    assert int(per_tensor.masks["b"].sum()) == round(0.137 * 300)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": 0.1, "exclude_top": 1.0}, "exclude_top"),
        ({"ratio": 0.1, "exclude_top": -0.1}, "exclude_top"),
        ({"ratio": 0.6, "exclude_top": 0.5}, "exclude_top + ratio"),
        ({"ratio": 0.1, "scope": "layer"}, "scope"),
        ({"ratio": 0.1, "select": "best"}, "select"),
        ({"ratio": 0.01}, "selects no neuron"),
    ],
)
def test_bad_selection_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("+", r"\+")):
        NeuronMask.from_scores(_scores(), **kwargs)


def test_nan_scores_error_names_the_parameter():
    scores = _scores()
    scores["a"][1, 0] = float("nan")
    for select in ("top", "random"):
        with pytest.raises(ValueError, match=r"'a'.*NaN"):
            NeuronMask.from_scores(scores, 0.5, select=select)
    with pytest.raises(TypeError, match="'i'"):
        NeuronMask.from_scores({"i": torch.arange(3)}, 0.5)


# ------------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_is_bit_exact_and_bit_packed(tmp_path):
    scores = {"w": torch.randn(200, 300, generator=torch.Generator().manual_seed(0)), "r": torch.randn(13)}
    mask = NeuronMask.from_scores(scores, 0.3, exclude_top=0.05)
    mask.save(tmp_path / "m")
    loaded = NeuronMask.load(tmp_path / "m")
    assert set(loaded.masks) == set(mask.masks)
    for name in mask.masks:
        assert loaded.masks[name].dtype == torch.bool
        assert torch.equal(loaded.masks[name], mask.masks[name])
    n = 200 * 300 + 13
    size = os.path.getsize(tmp_path / "m" / MASK_FILE)
    assert n / 8 <= size <= n / 8 + 512  # one bit per neuron plus the safetensors header
    header = json.loads((tmp_path / "m" / MASK_META_FILE).read_text())
    assert header["num_selected"] == mask.num_selected
    assert header["shapes"] == {"w": [200, 300], "r": [13]}
    assert header["exclude_top"] == 0.05 and header["scope"] == "global" and header["select"] == "top"
    assert loaded.ratio == mask.ratio


def _saved(tmp_path):
    NeuronMask.from_scores(_scores(), 3 / 7).save(tmp_path / "m")
    return tmp_path / "m"


def test_corrupt_and_truncated_mask_files_name_the_file(tmp_path):
    directory = _saved(tmp_path)
    data = (directory / MASK_FILE).read_bytes()
    (directory / MASK_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=MASK_FILE):
        NeuronMask.load(directory)
    (directory / MASK_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=MASK_FILE):
        NeuronMask.load(directory)
    (directory / MASK_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MASK_FILE):
        NeuronMask.load(directory)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NeuronMask.load(tmp_path / "nowhere")


def test_wrong_json_header_names_the_file(tmp_path):
    directory = _saved(tmp_path)
    meta = directory / MASK_META_FILE
    good = json.loads(meta.read_text())
    meta.write_text(json.dumps({**good, "format": "something-else"}))
    with pytest.raises(ValueError, match=MASK_META_FILE):
        NeuronMask.load(directory)
    meta.write_text("{not json")
    with pytest.raises(ValueError, match=MASK_META_FILE):
        NeuronMask.load(directory)
    meta.write_text(json.dumps({**good, "shapes": {**good["shapes"], "c": [5]}}))
    with pytest.raises(ValueError, match="different parameters"):
        NeuronMask.load(directory)
    meta.write_text(json.dumps({**good, "shapes": {"a": [3, 3], "b": [3]}}))  # 9 bits need 2 bytes, 1 stored
    with pytest.raises(ValueError, match=r"'a'.*does not match its shape"):
        NeuronMask.load(directory)
    meta.write_text(json.dumps({**good, "num_selected": 4}))
    with pytest.raises(ValueError, match="selects 3 neurons"):
        NeuronMask.load(directory)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match=MASK_META_FILE):
        NeuronMask.load(directory)


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def model():
    return testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=48)


def test_validate_names_the_parameter(model):
    mask = NeuronMask.full(model)
    mask.validate(model)
    foreign = NeuronMask({"transformer.h.0.attn.c_attn.weight": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        foreign.validate(model)
    wider = testbed.load_random_tiny("llama", hidden_size=48, num_layers=2, intermediate_size=48)
    with pytest.raises(ValueError, match=r"model\.(embed_tokens|layers\.0\.\S+)\.weight.*has shape"):
        NeuronMask.full(wider).validate(model)
    bad_rows = NeuronMask({"model.layers.1.mlp.up_proj.weight": torch.ones(47, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(47,\).*\(48,\)"):
        bad_rows.validate(model)
    NeuronMask({"model.layers.1.mlp.up_proj.weight": torch.ones(48, dtype=torch.bool)}).validate(model)


def test_full_and_random_targets(model):
    params = dict(model.named_parameters())
    element = NeuronMask.full(model)
    assert set(element.masks) == {n for n, p in params.items() if p.is_floating_point()}
    assert all(element.masks[n].shape == params[n].shape for n in element.masks)
    assert element.ratio == 1.0 and element.num_selected == sum(p.numel() for p in params.values())
    row = NeuronMask.full(model, "row")
    expected_rows = {n for n, p in params.items() if n.startswith("model.layers.") and p.dim() == 2}
    assert set(row.masks) == expected_rows and len(expected_rows) == 2 * 7
    assert all(row.masks[n].shape == (params[n].shape[0],) for n in row.masks)
    narrowed = NeuronMask.full(model, "row", target=["q_proj", "v_proj"])
    assert sorted(narrowed.masks) == sorted(n for n in expected_rows if "q_proj" in n or "v_proj" in n)
    regex = NeuronMask.random(model, 0.5, "element", target=r"mlp\.down_proj", seed=1)
    assert sorted(regex.masks) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    rnd = NeuronMask.random(model, 0.1, "row", seed=0)
    assert set(rnd.masks) == expected_rows
    assert rnd.num_selected == round(0.1 * sum(params[n].shape[0] for n in expected_rows))
    rnd_el = NeuronMask.random(model, 0.1, seed=0)
    assert rnd_el.num_selected == round(0.1 * sum(p.numel() for p in params.values()))
    assert _as_lists(rnd_el) == _as_lists(NeuronMask.random(model, 0.1, seed=0))
    with pytest.raises(ValueError, match="granularity"):
        NeuronMask.full(model, "column")
    with pytest.raises(ValueError, match="target"):
        NeuronMask.full(model, "row", target="no_such_module")


def test_union_intersection_by_hand():
    a = NeuronMask({"x": torch.tensor([1, 1, 0, 0]).bool(), "y": torch.tensor([[1, 0]]).bool()})
    b = NeuronMask({"x": torch.tensor([0, 1, 1, 0]).bool(), "z": torch.tensor([1, 1, 1]).bool()})
    union, inter = a.union(b), a.intersection(b)
    assert _as_lists(union) == {"x": [1, 1, 1, 0], "y": [[1, 0]], "z": [1, 1, 1]}
    assert _as_lists(inter) == {"x": [0, 1, 0, 0], "y": [[0, 0]], "z": [0, 0, 0]}
    assert union.num_selected == 7 and inter.num_selected == 1
    with pytest.raises(ValueError, match="'x'.*differ in shape"):
        a.union(NeuronMask({"x": torch.ones(5, dtype=torch.bool)}))


def test_per_layer_fraction_by_hand():
    mask = NeuronMask(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.tensor([1, 0, 0, 0]).bool(),
            "model.layers.0.mlp.up_proj.weight": torch.tensor([1, 1, 0, 0, 0, 0]).bool(),
            "model.layers.1.self_attn.q_proj.weight": torch.tensor([1, 1, 1, 0]).bool(),
            "lm_head.weight": torch.tensor([[1, 0], [0, 0]]).bool(),
        }
    )
    assert mask.per_layer_fraction() == {
        (0, "q_proj"): 0.25,
        (0, "up_proj"): 2 / 6,
        (1, "q_proj"): 0.75,
        (None, "lm_head"): 0.25,
    }


def _checkpoints(tmp_path):
    init = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=48)
    init.save_pretrained(tmp_path / "init")
    trained = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=48)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    trained.save_pretrained(tmp_path / "trained")
    before, after = init.state_dict(), trained.state_dict()
    return {n: (after[n] - before[n]).abs() for n in before}


def test_from_weight_diff_equals_hand_ranking(tmp_path):
    diff = _checkpoints(tmp_path)
    names = sorted(diff)
    flat = torch.cat([diff[n].reshape(-1) for n in names])
    k = round(0.05 * flat.numel())
    threshold = flat.sort(descending=True).values[k - 1]
    mask = NeuronMask.from_weight_diff(tmp_path / "init", tmp_path / "trained", 0.05)
    assert set(mask.masks) == set(names)
    assert mask.num_selected == k
    for n in names:
        assert torch.equal(mask.masks[n], diff[n] >= threshold), n
    # row granularity: decoder-layer matrices only, rows ranked by sum |Δ|
    rows = {n: d.sum(dim=1) for n, d in diff.items() if n.startswith("model.layers.") and d.dim() == 2}
    row_mask = NeuronMask.from_weight_diff(tmp_path / "init", tmp_path / "trained", 0.2, granularity="row")
    assert set(row_mask.masks) == set(rows)
    flat_rows = torch.cat([rows[n] for n in sorted(rows)])
    k_rows = round(0.2 * flat_rows.numel())
    cut = flat_rows.sort(descending=True).values[k_rows - 1]
    for n in rows:
        assert torch.equal(row_mask.masks[n], rows[n] >= cut), n
    band = NeuronMask.from_weight_diff(tmp_path / "init", tmp_path / "trained", 0.05, exclude_top=0.01)
    top_cut = flat.sort(descending=True).values[round(0.01 * flat.numel()) - 1]
    low_cut = flat.sort(descending=True).values[round(0.01 * flat.numel()) + k - 1]
    for n in names:
        assert torch.equal(band.masks[n], (diff[n] < top_cut) & (diff[n] >= low_cut)), n


@pytest.mark.parametrize("select", ["top", "bottom"])
@pytest.mark.parametrize("exclude_top", [0.0, 0.07])
def test_selection_equals_a_stable_sort_of_all_scores(select, exclude_top):
    """The counting selection (no concatenated sort) picks exactly what a stable sort of the concatenation would:
    negative scores, -0.0 == 0.0, and heavy ties included."""
    generator = torch.Generator().manual_seed(3)
    scores = {
        f"t{i}.weight": (torch.randint(-4, 5, (n,), generator=generator).float() / 2)
        for i, n in enumerate((37, 5, 64, 1))
    }
    scores["t1.weight"][0] = -0.0
    names = sorted(scores)
    flat = torch.cat([scores[n] + 0.0 for n in names])
    for ratio in (0.01, 0.2, 0.5, 0.93):
        mask = NeuronMask.from_scores(scores, ratio, select=select, exclude_top=exclude_top)
        order = flat.argsort(descending=select == "top", stable=True)
        skip, keep = round(exclude_top * flat.numel()), round(ratio * flat.numel())
        if skip + keep > flat.numel() or keep == 0:
            continue
        expected = torch.zeros(flat.numel(), dtype=torch.bool)
        expected[order[skip : skip + keep]] = True
        got = torch.cat([mask.masks[n].reshape(-1) for n in names])
        assert torch.equal(got, expected), (ratio, select, exclude_top)


def test_a_mask_selection_is_the_same_as_the_keyword_arguments():
    from hf_align.masks import MaskSelection

    selection = MaskSelection(ratio=2 / 7, exclude_top=1 / 7, select="bottom")
    by_selection = NeuronMask.from_scores(_scores(), selection)
    assert _as_lists(by_selection) == _as_lists(
        NeuronMask.from_scores(_scores(), 2 / 7, exclude_top=1 / 7, select="bottom")
    )
    assert _as_lists(NeuronMask.from_scores(_scores(), selection, select="top")) == _as_lists(
        NeuronMask.from_scores(_scores(), 2 / 7, exclude_top=1 / 7)
    )  # a keyword overrides the selection's field
    with pytest.raises(ValueError, match=r"MaskSelection.ratio is required"):
        NeuronMask.from_scores(_scores(), MaskSelection())
    with pytest.raises(ValueError, match=r"^MaskSelection.scope must be one of \('global', 'tensor'\), got 'layer'.$"):
        MaskSelection(ratio=0.1, scope="layer")


def test_function_arguments_that_are_declared_options_are_checked_against_the_declaration():
    """``granularity=`` / ``statistic=`` of the score and mask functions are ScoreOptions' fields: the same choices,
    one line naming the argument."""
    from hf_align.scores import reduce_magnitude

    weight = torch.ones(2, 3)
    cases = [
        (lambda: reduce_magnitude(weight, "column"), "granularity must be one of ('row', 'element'), got 'column'."),
        (lambda: reduce_magnitude(weight, "row", "cube"), "statistic must be one of ('abs', 'square'), got 'cube'."),
        (lambda: NeuronMask.full(torch.nn.Linear(3, 2), "column"), "granularity must be one of ('row', 'element')"),
    ]
    for call, expected in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert expected in str(error.value) and "\n" not in str(error.value)
