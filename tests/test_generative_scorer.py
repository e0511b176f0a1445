"""GenerativeScorer (ALLO's token-level reward from a correcting LM) and `label-tokens --method generative`.

The reference is written out here: one unpadded forward per prefix, the probability of the next token read off
the last position. The scorer batches, pads and maps its tokens to the trainer's by character offsets.
"""

import json

import pytest
import torch

from hf_align import testbed
from hf_align.cli import main
from hf_align.key_tokens import GenerativeScorer


TEMPLATE = "{problem}{prediction} {problem}"  # the scorer sees the wrong answer, then re-answers the problem
ITEMS = [("12+30=", "41", "42"), ("rev 3814=", "4183", "4183"), ("7+5=", "13 ugh", "12")]


@pytest.fixture(scope="module")
def tb():
    return testbed.load()


def _reference_probabilities(model, tokenizer, problem: str, prediction: str) -> list[tuple[int, int, float]]:
    """(start, end, p) of every token that ends inside the prediction, one plain forward per prefix."""
    context = TEMPLATE.format(problem=problem, prediction=prediction, solution="")
    encoded = tokenizer(context + prediction, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    out = []
    for j in range(1, len(ids)):
        start, end = offsets[j]
        if end <= len(context) or end <= start:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:j]])).logits[0, -1]
        p = float(logits.float().softmax(-1)[ids[j]])
        out.append((max(start, len(context)) - len(context), end - len(context), p))
    return out


def test_char_probabilities_match_one_forward_per_prefix(tb):
    scorer = GenerativeScorer(tb.model, tb.tokenizer, template=TEMPLATE, batch_size=2)  # padded batches
    got = scorer.char_probabilities([(problem, prediction, "") for problem, prediction, _ in ITEMS])
    for (problem, prediction, _), spans in zip(ITEMS, got, strict=True):
        expected = _reference_probabilities(tb.model, tb.tokenizer, problem, prediction)
        assert [(s, e) for s, e, _ in spans] == [(s, e) for s, e, _ in expected]
        assert spans[-1][1] == len(prediction)  # the spans cover the prediction up to its last character
        torch.testing.assert_close(
            torch.tensor([p for *_, p in spans]), torch.tensor([p for *_, p in expected]), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("selection", ["threshold", "lowest", "probability"])
def test_batch_weights_apply_the_selection_to_the_scorer_probabilities(tb, selection):
    """Same tokenizer for trainer and scorer: one span per completion token; the appended EOS is not scorable."""
    scorer = GenerativeScorer(
        tb.model, tb.tokenizer, template=TEMPLATE, selection=selection, threshold=0.3, lowest_fraction=0.5,
        key=2.0, floor=0.25,
    )  # fmt: skip
    prompts, predictions = [i[0] for i in ITEMS], [i[1] for i in ITEMS]
    weights = scorer.batch_weights(tb.tokenizer, prompts, predictions)
    for (problem, prediction, _), row in zip(ITEMS, weights, strict=True):
        probs = [p for *_, p in _reference_probabilities(tb.model, tb.tokenizer, problem, prediction)]
        if selection == "threshold":
            expected = [2.0 if p < 0.3 else 0.25 for p in probs]
        elif selection == "lowest":
            k = max(1, round(0.5 * len(probs)))
            cut = sorted(probs)[k - 1]
            expected = [2.0 if p <= cut else 0.25 for p in probs]
        else:
            expected = probs
        assert row[-1] == 0.25  # EOS
        torch.testing.assert_close(torch.tensor(row[:-1]), torch.tensor(expected), rtol=1e-4, atol=1e-6)


def test_a_trainer_token_takes_the_lowest_probability_of_the_scorer_tokens_it_overlaps(tb, monkeypatch):
    """Scorer and trainer tokenize differently: '68 ugh' is [6][8][ ugh] for the trainer, four pieces for the scorer."""
    scorer = GenerativeScorer(tb.model, tb.tokenizer, template=TEMPLATE, threshold=0.5)
    spans = [(0, 1, 0.9), (1, 2, 0.4), (2, 4, 0.8), (4, 6, 0.3)]  # '6', '8', ' u', 'gh'
    monkeypatch.setattr(scorer, "char_probabilities", lambda items: [spans])
    assert len(tb.tokenizer("68 ugh", add_special_tokens=False)["input_ids"]) == 3  # the premise of this test
    assert scorer.weights(tb.tokenizer, "rev 86=", "68 ugh") == [0.0, 1.0, 1.0, 0.0]  # min(0.8, 0.3) < 0.5; EOS 0
    scorer.selection = "probability"
    assert scorer.weights(tb.tokenizer, "rev 86=", "68 ugh") == [0.9, 0.4, 0.3, 0.0]


def test_label_tokens_generative_cli_writes_the_scorers_weights(tb, tmp_path):
    out = tmp_path / "labeled.jsonl"
    argv = [
        "label-tokens", "--dataset", "testbed:preference", "--tokenizer", "testbed", "--output", str(out),
        "--method", "generative", "--scorer", "testbed", "--template", TEMPLATE, "--selection", "probability",
        "--max-rows", "6", "--batch-size", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    scorer = GenerativeScorer(tb.model, tb.tokenizer, template=TEMPLATE, selection="probability")
    for row in rows:
        expected = scorer.weights(tb.tokenizer, row["prompt"], row["rejected"], row["chosen"])
        torch.testing.assert_close(torch.tensor(row["rejected_weights"]), torch.tensor(expected), rtol=1e-5, atol=1e-7)
        assert 0.0 < min(row["rejected_weights"][:-1]) and max(row["rejected_weights"]) <= 1.0


def test_generative_without_a_scorer_names_the_flag(tmp_path, capsys):
    argv = ["label-tokens", "--dataset", "testbed:preference", "--tokenizer", "testbed", "--output",
            str(tmp_path / "x.jsonl"), "--method", "generative"]  # fmt: skip
    assert main(argv) != 0
    assert "--scorer" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
