"""Every bad dataset is named when the trainer is built, before any model work: the column, the row and the fix.

Before, these failed deep in TRL (``'NoneType' object has no attribute 'endswith'``), at ``train()`` (torch's
``num_samples=0``), or trained silently on data that could not mean what it said.
"""

import warnings

import pytest
from datasets import Dataset

from hf_align import testbed
from hf_align.testbed import quiet_training_args
from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer, NPOConfig, NPOTrainer


def _pairs(conversational=False):
    data = testbed.preference_dataset(4, seed=0, conversational=conversational)
    return [dict(r) for r in data.remove_columns("rejected_wrong_positions").to_list()]


def _forget():
    return [{"prompt": r["prompt"], "completion": r["rejected"]} for r in _pairs()]


def _build(tmp_path, rows, trainer="dpo", **overrides):
    config, cls = (MaskedDPOConfig, MaskedDPOTrainer) if trainer == "dpo" else (NPOConfig, NPOTrainer)
    args = config(**quiet_training_args(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
        **overrides,
    ))  # fmt: skip
    tb = testbed.load()
    return cls(model=tb.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tb.tokenizer)


def _with(rows, row, **values):
    rows[row].update(values)
    return rows


def _messages_without_role():
    rows = _pairs(conversational=True)
    rows[2]["prompt"] = [{"content": "2+2="}]
    return rows


def _messages_with_unknown_role():
    rows = _pairs(conversational=True)
    rows[1]["prompt"] = [{"role": "usr", "content": "2+2="}]
    return rows


def _string_weights(column):
    rows = _pairs() if column == "rejected_weights" else _forget()
    text = "rejected" if column == "rejected_weights" else "completion"
    for r in rows:
        r[column] = "1" * len(r[text])
    return rows


CASES = [
    ("dpo", lambda: _with(_pairs(), 1, chosen=None), r"column 'chosen', row 1: is empty \(None\).*fill or drop"),
    ("npo", lambda: _with(_forget(), 3, completion=None), r"column 'completion', row 3: is empty \(None\)"),
    ("dpo", lambda: [dict(r, prompt=7) for r in _pairs()], r"column 'prompt', row 0: holds 7 \(int\)"),
    ("dpo", _messages_without_role, r"column 'prompt', row 2: message 0 has no 'role'"),
    ("dpo", _messages_with_unknown_role, r"column 'prompt', row 1: message 0 has role 'usr'"),
    ("dpo", lambda: _string_weights("rejected_weights"), r"'rejected_weights', row 0: expected a list of numbers"),
    ("npo", lambda: _string_weights("completion_weights"), r"'completion_weights', row 0: expected a list of num"),
]


@pytest.mark.parametrize("trainer, rows, pattern", CASES, ids=[f"{t}-{p[:25]}" for t, _, p in CASES])
def test_a_bad_row_is_named_when_the_trainer_is_built(tmp_path, trainer, rows, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        _build(tmp_path, rows(), trainer)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("trainer", ["dpo", "npo"])
def test_every_completion_truncated_away_is_an_error_naming_max_length(tmp_path, trainer):
    rows = _pairs() if trainer == "dpo" else _forget()
    with pytest.raises(ValueError, match=r"max_length=3 with truncation_mode='keep_start' leaves no completion"):
        _build(tmp_path, rows, trainer, max_length=3)


def test_identical_pairs_warn_that_there_is_nothing_to_learn(tmp_path):
    rows = [dict(r, rejected=r["chosen"]) for r in _pairs()]
    with pytest.warns(UserWarning, match="'chosen' equals 'rejected' in every one of its 4 rows"):
        _build(tmp_path, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rows[0]["rejected"] = "no"  # one real pair: no warning
        from hf_align.trainers._data_checks import check_rows

        check_rows(Dataset.from_list(rows), "train_dataset")


def test_all_zero_weights_warn(tmp_path):
    rows = [dict(r, rejected_weights=[0.0] * (len(r["rejected"]) + 1)) for r in _pairs()]  # EOS too
    with pytest.warns(UserWarning, match="'rejected_weights' is 0 for every token of every row"):
        _build(tmp_path, rows)


def test_forget_data_in_two_formats_at_once_is_refused(tmp_path):
    rows = [dict(r, messages=[{"role": "user", "content": r["prompt"]}]) for r in _forget()]
    with pytest.raises(ValueError, match=r"holds both prompt\+completion and messages: keep the columns of one"):
        _build(tmp_path, rows, "npo")
