"""DataPool: quantile binning, balancing, length rejection, bounds and persistence vs hand computations."""

import numpy as np
import pytest

from hf_align.data_pool import DataPool, quantile_bins


def _hand_bins(scores, k):
    """Independent reference: sort best first, np.array_split the positions, ties take their best position's bin."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: -scores[i])
    chunks = np.array_split(np.arange(n), k)
    bin_of_position = {int(p): b for b, chunk in enumerate(chunks) for p in chunk}
    out = []
    for s in scores:
        first_position = min(pos for pos, i in enumerate(order) if scores[i] == s)
        out.append(bin_of_position[first_position])
    return out


@pytest.mark.parametrize(
    "scores, k, expected",
    [
        ([0.9, 0.1, 0.5, 0.7, 0.3], 5, [0, 4, 2, 1, 3]),  # distinct: one per bin
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4, [3, 3, 2, 2, 1, 1, 1, 0, 0, 0]),  # array_split sizes 3, 3, 2, 2
        ([1.0, 1.0, 1.0, 0.0, 0.0], 2, [0, 0, 0, 1, 1]),  # tie spanning the split point stays in bin 0
        ([0.5, 0.5, 0.2, 0.9], 2, [0, 0, 1, 0]),  # 0.9 at pos 0, 0.5s at pos 1-2 → bin of pos 1 = 0
        ([3.0, 1.0, 2.0], 1, [0, 0, 0]),  # K = 1
        ([3.0, 1.0, 2.0], 5, [0, 2, 1]),  # fewer samples than bins: rank = bin, bins 3, 4 empty
        ([2.0, 2.0], 5, [0, 0]),  # all tied
    ],
)
def test_quantile_bins_match_hand_computation(scores, k, expected):
    assert quantile_bins(np.array(scores), k).tolist() == expected
    assert _hand_bins(scores, k) == expected


def test_quantile_bins_random_against_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 7))
        scores = rng.integers(0, 5, n).astype(float).tolist()  # many ties
        assert quantile_bins(np.array(scores), k).tolist() == _hand_bins(scores, k)


def test_bins_are_recomputed_over_the_whole_pool():
    pool = DataPool(num_quantiles=2)
    pool.add(["a", "b"], ["x", "y"], scores=[0.2, 0.1])
    assert pool.bins().tolist() == [0, 1]
    pool.add(["c", "d"], ["z", "w"], scores=[0.9, 0.8], iteration=1)
    assert pool.bins().tolist() == [1, 1, 0, 0]  # the old best is now in the lower half


def test_balanced_sampling_gives_equal_counts_per_group():
    pool = DataPool(feedback_type="category", categories=["good", "ok", "bad"], seed=0)
    labels = ["good"] * 10 + ["ok"] * 100 + ["bad"] * 1000
    pool.add([f"p{i}" for i in range(len(labels))], ["c"] * len(labels), feedback=labels)
    index = pool.sample(300, rng=np.random.default_rng(1))
    counts = {c: int(np.sum(pool.feedback[index] == c)) for c in pool.categories}
    assert counts == {"good": 100, "ok": 100, "bad": 100}
    # "good" has only 10 rows: every one of them appears (then it is topped up with replacement).
    assert set(np.flatnonzero(pool.feedback == "good")) <= set(index.tolist())
    # The remainder of an uneven split goes to distinct groups: sizes differ by at most one.
    index = pool.sample(301, rng=np.random.default_rng(2))
    sizes = sorted(int(np.sum(pool.feedback[index] == c)) for c in pool.categories)
    assert sizes == [100, 100, 101]


def test_unbalanced_sampling_follows_the_pool():
    pool = DataPool(feedback_type="category", categories=["good", "bad"], seed=0)
    pool.add(["p"] * 1000, ["c"] * 1000, feedback=["good"] * 100 + ["bad"] * 900)
    index = pool.sample(20000, balance=False, rng=np.random.default_rng(0))
    assert abs(np.mean(pool.feedback[index] == "good") - 0.1) < 0.01


def test_length_rejection_equalises_length_histograms():
    rng = np.random.default_rng(0)
    n = 6000
    scores = rng.random(n)
    # Good samples are short, bad ones long: exactly the shortcut ALT's length balancing removes.
    lengths = np.clip(np.round(20 - 12 * scores + rng.normal(0, 3, n)), 1, None).astype(int)
    pool = DataPool(num_quantiles=3)
    pool.add([f"p{i}" for i in range(n)], ["c"] * n, scores=scores, lengths=lengths)
    groups = pool.groups()
    edges = np.quantile(lengths, np.linspace(0, 1, 9))
    before = [np.histogram(lengths[groups == g], edges)[0] / np.sum(groups == g) for g in range(3)]
    assert np.abs(before[0] - before[2]).max() > 0.2  # really different before

    index = pool.sample(6000, balance_lengths=True, rng=np.random.default_rng(1), num_length_buckets=8)
    kept = [lengths[index][groups[index] == g] for g in range(3)]
    after = [np.histogram(k, edges)[0] / len(k) for k in kept]
    for g in (1, 2):
        assert np.abs(after[0] - after[g]).max() < 0.06, (after[0], after[g])
    assert [len(k) for k in kept] == [2000, 2000, 2000]


def test_length_mask_keeps_identical_distributions_whole():
    pool = DataPool(num_quantiles=2)
    pool.add(["p"] * 8, ["c"] * 8, scores=[1, 2, 3, 4, 5, 6, 7, 8], lengths=[1, 2, 3, 4, 1, 2, 3, 4])
    mask = pool.length_balanced_mask(pool.groups(), np.random.default_rng(0))
    assert mask.all()  # nothing to correct: every row has acceptance probability 1


def test_bounds_per_prompt_keep_newest_or_best():
    newest = DataPool(max_per_prompt=2, keep="newest")
    best = DataPool(max_per_prompt=2, keep="best")
    for pool in (newest, best):
        pool.add(["a", "a", "b"], ["a1", "a2", "b1"], scores=[0.9, 0.1, 0.5], iteration=0)
        pool.add(["a", "b"], ["a3", "b2"], scores=[0.5, 0.4], iteration=1)
    assert sorted(newest.completion.tolist()) == ["a2", "a3", "b1", "b2"]
    assert sorted(best.completion.tolist()) == ["a1", "a3", "b1", "b2"]


def test_max_size_drops_oldest():
    pool = DataPool(max_size=3)
    pool.add(["a", "b", "c", "d", "e"], list("12345"), scores=[1, 2, 3, 4, 5])
    assert pool.completion.tolist() == ["3", "4", "5"]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown feedback category.*'meh'"):
        DataPool(feedback_type="category", categories=["good", "bad"]).add(["p"], ["c"], feedback=["meh"])
    with pytest.raises(ValueError, match="Non-finite score nan"):
        DataPool().add(["p", "q"], ["c", "d"], scores=[1.0, float("nan")])
    with pytest.raises(ValueError, match="Non-finite score inf"):
        DataPool(feedback_type="text").add(["p"], ["c"], feedback=["fine"], scores=[float("inf")])


def test_best_text_feedback_is_top_scoring_row():
    pool = DataPool(feedback_type="text")
    pool.add(["p"] * 3, ["a", "b", "c"], feedback=["meh", "great answer", "wrong"], scores=[0.3, 0.9, 0.1])
    assert pool.best_text_feedback() == "great answer"


def test_save_load_roundtrip_is_identical(tmp_path):
    pool = DataPool(feedback_type="text", num_quantiles=3, max_per_prompt=5, seed=7)
    pool.add(["p1", [{"role": "user", "content": "hi"}]], ["a", "b"], feedback=["f1", "f2"], scores=[0.5, None])
    pool.add(["p1"], ["c"], feedback=["f3"], scores=[0.7], iteration=1, lengths=[4])
    pool.rng.random(3)  # advance the RNG: its state must survive too
    pool.save(tmp_path / "pool")
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == ["pool.json", "pool.parquet"]
    loaded = DataPool.load(tmp_path / "pool")
    assert loaded.prompt.tolist() == pool.prompt.tolist()
    assert loaded.feedback.tolist() == pool.feedback.tolist()
    np.testing.assert_array_equal(loaded.score, pool.score)
    for name in ("iteration", "length", "seq"):
        assert getattr(loaded, name).tolist() == getattr(pool, name).tolist()
    assert loaded.rng.random(5).tolist() == pool.rng.random(5).tolist()
    assert loaded.sample(10).tolist() == pool.sample(10).tolist()
    loaded.add(["p2"], ["d"], feedback=["f4"], scores=[0.1])
    assert loaded.seq[-1] == 3


def test_load_rejects_a_truncated_table(tmp_path):
    pool = DataPool()
    pool.add(["p"], ["c"], scores=[1.0])
    pool.save(tmp_path)
    (tmp_path / "pool.json").write_text((tmp_path / "pool.json").read_text().replace('"num_rows": 1', '"num_rows": 2'))
    with pytest.raises(ValueError, match="pool.parquet.*1 rows"):
        DataPool.load(tmp_path)


def test_load_refuses_table_and_state_from_different_saves(tmp_path, monkeypatch):
    """A crash between the two renames of a save leaves the new rows beside the old state (same row count here,
    so only the save id can tell): the load must refuse, naming both files, not mix them silently."""
    import os

    first = DataPool()
    first.add(["p"], ["old"], scores=[1.0])
    first.save(tmp_path)
    second = DataPool(seed=7)
    second.add(["p"], ["new"], scores=[2.0])
    real_replace = os.replace

    def crash_before_the_state_lands(src, dst):
        if str(dst) == str(tmp_path / "pool.json"):
            raise OSError("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_the_state_lands)
    with pytest.raises(OSError, match="killed"):
        second.save(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(ValueError, match=r"pool\.parquet.*pool\.json.*different saves"):
        DataPool.load(tmp_path)
    first.save(tmp_path)  # a complete save loads again
    assert DataPool.load(tmp_path).completion.tolist() == ["old"]


class _QuarkPoolTranscript:
    """Quark's DataPool.add (GXimingLu/Quark, data_pool.py) written out: re-sort the whole pool by score, best
    first, with Python's stable sort; N // K rows per bin token, the remainder in the last bin."""

    def __init__(self, k):
        self.k, self.rows = k, []

    def add(self, responses, scores):
        self.rows = sorted([*self.rows, *zip(responses, scores)], key=lambda row: row[1], reverse=True)
        per_bin = len(self.rows) // self.k
        positions = [b for b in range(self.k) for _ in range(per_bin)]
        positions += [self.k - 1] * (len(self.rows) - len(positions))
        return {response: b for (response, _), b in zip(self.rows, positions)}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_quark_rule_matches_quarks_data_pool_over_several_adds(k):
    rng = np.random.default_rng(k)
    pool, reference = DataPool(num_quantiles=k, quantile_rule="quark"), _QuarkPoolTranscript(k)
    for step, size in enumerate((2, 7, 11, 4)):  # the first add has fewer rows than bins for k=3 and k=5
        scores = rng.choice([0.0, 0.25, 0.5, 1.0], size=size).tolist()  # many ties
        responses = [f"r{step}-{i}" for i in range(size)]
        pool.add(["p"] * size, responses, scores=scores)
        expected = reference.add(responses, scores)
        assert pool.bins().tolist() == [expected[r] for r in pool.completion]


def test_quark_rule_fills_every_bin_where_shared_ties_leave_one_empty(tmp_path):
    scores = [1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    shared, quark = DataPool(num_quantiles=5), DataPool(num_quantiles=5, quantile_rule="quark")
    for pool in (shared, quark):
        pool.add(["p"] * len(scores), [str(i) for i in range(len(scores))], scores=scores)
    assert shared.bin_counts().tolist() == [2, 8, 0, 0, 0]  # the zeros take the bin of their best position (3)
    assert quark.bin_counts().tolist() == [2, 2, 2, 2, 2]
    quark.save(tmp_path)
    assert DataPool.load(tmp_path).quantile_rule == "quark"
    with pytest.raises(ValueError, match="quantile_rule"):
        DataPool(quantile_rule="rank")
