"""hf_align.token_weights: validation, char-span weights vs the testbed's ground truth, selection, LD multiplier."""

import math

import pytest
import torch

from hf_align import testbed
from hf_align.token_weights import (
    char_span_weights,
    check_weight_columns,
    ld_alpha_multiplier,
    normalize_token_weights,
    select_lowest_ratio_tokens,
    weights_from_char_spans,
)


EOS = 7


def test_normalize_accepts_full_length_and_appends_eos_weight():
    assert normalize_token_weights([0.5, 2], [3, EOS], column="c", row=0, eos_token_id=EOS) == [0.5, 2.0]
    got = normalize_token_weights([0.5], [3, EOS], column="c", row=0, eos_token_id=EOS, eos_token_weight=0.25)
    assert got == [0.5, 0.25]


@pytest.mark.parametrize(
    ("weights", "ids", "message"),
    [
        ([1.0], [3, 4], r"'rejected_weights', row 5: 1 weights for 2 completion tokens; expected 2\."),
        ([1.0, 1.0, 1.0], [3, EOS], r"row 5: 3 weights .* expected 2 \(or 1, without the final EOS\)"),
        ([1.0, -0.1], [3, 4], r"row 5: weight -0.1 at token 1"),
        ([math.nan, 1.0], [3, 4], r"row 5: weight nan at token 0"),
        ([math.inf, 1.0], [3, 4], r"row 5: weight inf"),
        (None, [3], r"row 5: weights are missing"),
        ("ab", [3, 4], r"row 5: expected a list of numbers"),
    ],
)
def test_normalize_rejects_bad_rows(weights, ids, message):
    with pytest.raises(ValueError, match=message):
        normalize_token_weights(weights, ids, column="rejected_weights", row=5, eos_token_id=EOS)


def test_check_weight_columns():
    assert check_weight_columns(["prompt", "chosen", "chosen_weights"], ["chosen_weights"]) == ["chosen_weights"]
    with pytest.raises(ValueError, match="'rejected_weights' column but no 'rejected'"):
        check_weight_columns(["prompt", "rejected_weights"], ["rejected_weights"])
    with pytest.raises(ValueError, match="'completion_weights'.*only reads"):
        check_weight_columns(["completion", "completion_weights"], ["chosen_weights"])


@pytest.mark.parametrize("conversational", [False, True])
def test_char_span_weights_match_testbed_token_correctness(tokenizer, conversational):
    """Weights from the wrong character positions mark exactly the tokens the testbed calls wrong."""
    data = testbed.preference_dataset(16, seed=4, conversational=conversational)
    fn = char_span_weights(tokenizer, "rejected_wrong_positions", positions=True, inside=1.0, outside=0.0)
    checked = 0
    for example in data:
        weights = fn(example)["rejected_weights"]
        text = example["rejected"] if not conversational else example["rejected"][0]["content"]
        target = example["chosen"] if not conversational else example["chosen"][0]["content"]
        ids = tokenizer(text + tokenizer.eos_token)["input_ids"]
        assert len(weights) == len(ids)  # one per completion token, the appended/template EOS included
        pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        wrong = [not ok for ok in testbed.token_correctness(target, pieces)]
        assert weights[:-1] == [float(w) for w in wrong[:-1]]
        assert weights[-1] == 1.0  # EOS: outside the completion text -> `special`
        checked += any(wrong) and not all(wrong[:-1])
    assert checked > 0  # some rows mix right and wrong tokens


def test_char_spans_on_multi_char_tokens(tokenizer):
    weights = weights_from_char_spans(
        tokenizer, "rev 12=", "answer 42", [(7, 8)], inside=2.0, outside=0.5, special=0.0
    )
    ids = tokenizer("rev 12=answer 42" + tokenizer.eos_token)["input_ids"]
    prompt_ids = tokenizer("rev 12=")["input_ids"]
    assert len(weights) == len(ids) - len(prompt_ids)
    assert weights[-1] == 0.0 and weights.count(2.0) == 1  # only the token holding '4' is inside


def test_select_lowest_ratio_tokens_by_hand():
    pol = torch.tensor([[0.0, -1.0, -3.0, -2.0, 0.0, 5.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    ref = torch.zeros_like(pol)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    # row 0: 4 tokens, ratio 0.5 -> k = 2 lowest of (-1, -3, -2, 0) -> -3, -2
    # row 1: 3 tokens, k = floor(1.5) = 1, all tied at 1.0 -> ties included (as ALLO) -> all three
    got = select_lowest_ratio_tokens(pol, ref, mask, 0.5)
    assert got.tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert select_lowest_ratio_tokens(pol, ref, mask, 0.1).tolist()[0] == [0, 0, 1, 0, 0, 0]  # k >= 1
    with pytest.raises(ValueError, match="rejected_token_ratio"):
        select_lowest_ratio_tokens(pol, ref, mask, 0.0)


def test_ld_alpha_multiplier_matches_trl_split():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])  # pairs (0, 2) and (1, 3)
    got = ld_alpha_multiplier(mask, 0.5)
    # pair 0: lens 3 vs 2 -> shared 2; pair 1: lens 2 vs 4 -> shared 2
    expected = torch.tensor([[0, 1, 1, 0.5], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0.5, 0.5]])
    torch.testing.assert_close(got, expected)
    assert ld_alpha_multiplier(mask, None) is None
