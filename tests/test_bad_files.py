"""Files we read back are checked against what they claim, and a missing key names the key and the file.

A mask header with a shape that is no integer list, a ``num_selected`` that is a string, or a granularity its
data contradicts loaded silently (or failed with ``invalid literal for int()``); a pool or plan JSON missing a key
raised a bare ``KeyError``.
"""

import json

import pytest

from hf_align import testbed
from hf_align.data_pool import POOL_META, DataPool
from hf_align.masks import MASK_META_FILE, NeuronMask
from hf_align.merging.plan import PLAN_FILE, MergePlan, linear_plan


def _saved_mask(tmp_path, granularity="element"):
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    folder = tmp_path / "mask"
    NeuronMask.random(model, 0.1, granularity, seed=0).save(folder)
    return folder


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first_shape(value):
    def change(header):
        header["shapes"][next(iter(header["shapes"]))] = value

    return change


MASK_CASES = [
    ("row over element data", lambda h: h.update(granularity="row"), r"says granularity 'row' but mask"),
    ("unknown granularity", lambda h: h.update(granularity="column"), r"granularity must be one of"),
    ("num_selected a string", lambda h: h.update(num_selected=str(h["num_selected"])), "must be an integer"),
    ("num_selected a float", lambda h: h.update(num_selected=h["num_selected"] + 0.5), "must be an integer"),
    ("num_selected a bool", lambda h: h.update(num_selected=True), "must be an integer"),
    ("shape a string", _first_shape("32x32"), r"shapes\[.*\] must be a list of non-negative integers"),
    ("shape with a float", _first_shape([32.5, 32]), r"must be a list of non-negative integers"),
    ("shape with a negative", _first_shape([-1, 32]), r"must be a list of non-negative integers"),
    ("shape with a bool", _first_shape([True, 32]), r"must be a list of non-negative integers"),
]


@pytest.mark.parametrize("label, change, pattern", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_a_mask_header_that_contradicts_its_data_is_refused(tmp_path, label, change, pattern):
    folder = _saved_mask(tmp_path)
    _edit(folder / MASK_META_FILE, change)
    with pytest.raises(ValueError, match=pattern) as error:
        NeuronMask.load(folder)
    assert MASK_META_FILE in str(error.value)


def test_a_row_mask_still_loads_as_rows(tmp_path):
    assert NeuronMask.load(_saved_mask(tmp_path, "row")).granularity == "row"


def _saved_pool(tmp_path):
    pool = DataPool(feedback_type="quantile", num_quantiles=2)
    pool.add(["p1", "p2"], ["c1", "c2"], scores=[0.1, 0.9], iteration=0)
    folder = tmp_path / "pool"
    pool.save(folder)
    return folder


@pytest.mark.parametrize("key", ["num_rows", "feedback_type", "rng_state", "next_seq"])
def test_a_pool_header_missing_a_key_names_it_and_the_file(tmp_path, key):
    folder = _saved_pool(tmp_path)
    _edit(folder / POOL_META, lambda meta: meta.pop(key))
    with pytest.raises(ValueError, match=rf"{POOL_META}' is missing the key\(s\) \['{key}'\]"):
        DataPool.load(folder)


def test_a_plan_without_alphas_or_with_a_bad_alpha_is_named(tmp_path):
    linear_plan(["a.weight", "b.weight"], 0.3).save(tmp_path)
    _edit(tmp_path / PLAN_FILE, lambda plan: plan.pop("alphas"))
    with pytest.raises(ValueError, match=rf"{PLAN_FILE}' is missing the key\(s\) \['alphas'\]"):
        MergePlan.load(tmp_path)
    linear_plan(["a.weight"], 0.3).save(tmp_path)
    _edit(tmp_path / PLAN_FILE, lambda plan: plan["alphas"].update({"a.weight": 1.5}))
    with pytest.raises(ValueError, match=r"alphas\['a.weight'\] must be in \[0, 1\]"):
        MergePlan.load(tmp_path)


def test_equal_scores_and_an_empty_mask_warn_that_nothing_meaningful_will_train(tmp_path):
    import torch

    with pytest.warns(UserWarning, match="Every score is equal"):
        NeuronMask.from_scores({"a.weight": torch.ones(4, 3), "b.weight": torch.ones(5)}, 0.5)
    with pytest.warns(UserWarning, match="selects no neuron"):
        NeuronMask({"a.weight": torch.zeros(4, dtype=torch.bool)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        NeuronMask.from_scores({"a.weight": torch.arange(12.0).view(4, 3)}, 0.5)  # distinct scores: quiet
        NeuronMask.from_scores({"a.weight": torch.ones(4, 3)}, 0.5, select="random")  # random ignores the scores
