"""The data pool of ALT / Quark: every sampled generation with the feedback it earned.

Columns: ``prompt``, ``completion``, ``feedback`` (category or text; ``None`` for pure rewards),
``score`` (float; NaN when the feedback has no score), ``iteration``, ``length`` (generation length,
in tokens when the trainer fills it) and ``seq`` (insertion order, used for "newest").

Rules (each one tested against a hand computation in ``tests/test_data_pool.py``):

* **Quantile bins** are recomputed over the *whole* pool each time they are asked for (Quark).
  Samples are sorted by score, best first; positions are split into ``K`` consecutive chunks exactly
  like ``np.array_split`` (the first ``N % K`` chunks one larger), chunk 0 = best (Quark's
  ``_QUANTILE_TOKEN_0_``). **Ties** share one bin: every sample takes the bin of the *best* position
  among its equal-score group (its "min rank" = number of samples with a strictly higher score), so
  the result does not depend on insertion order. ``K = 1`` puts everything in bin 0; with fewer
  samples than bins (``N < K``) sample ``r`` goes to bin ``r`` and the last bins stay empty.
  ``quantile_rule="quark"`` reproduces Quark's ``data_pool.py`` instead: a stable sort by score (best
  first; ties in insertion order), chunks of ``N // K`` positions, the remainder -- or everything when
  ``N < K`` -- in the last bin. Ties can then get different bins, but no bin stays empty once ``N >= K``.
* **Balanced sampling** draws the same number of rows from every non-empty feedback group (quantile
  bin, category or text-score bin); the ``n % G`` remainder goes to randomly chosen groups. A group
  smaller than its share gives all its rows once, then is topped up with replacement.
* **Length balancing** (ALT) is rejection sampling: lengths are bucketed on pool-wide quantile edges;
  the target length distribution is the normalised minimum over groups of the per-group
  histograms; a row of group ``g`` in bucket ``b`` is kept with probability
  ``(t_b / p_gb) / max_b'(t_b' / p_gb')``. Every group's kept lengths then follow ``t``, so the
  model cannot learn "short = good" from the feedback tokens.
* **Bounds**: ``max_per_prompt`` keeps, per prompt, the newest rows (``keep="newest"``) or the
  best-scoring rows (``keep="best"``, ties → newer first); ``max_size`` then drops the oldest rows.

Everything is vectorised numpy (no Python loop over the pool), the RNG is a seeded numpy
``Generator`` whose state is saved with the pool (``pool.parquet`` + ``pool.json``, never pickle). Both files
carry one save id (parquet schema metadata / JSON), so a pool whose two files come from different saves (a crash
between the two renames) is refused on load instead of mixing one save's rows with another's RNG state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_align.config_checks import check_option, option
from hf_align.feedback_format import FeedbackFormat
from hf_align.io import PathLike, atomic_files, check_same_save, new_save_id, read_json, require_keys, write_json


POOL_TABLE = "pool.parquet"
POOL_META = "pool.json"
_SAVE_ID = "save_id"  # in pool.json and in pool.parquet's schema metadata: which save wrote the file
_NUMERIC = {"score": np.float64, "iteration": np.int64, "length": np.int64, "seq": np.int64}
_META_KEYS = (
    "num_rows", "feedback_type", "num_quantiles", "categories", "max_per_prompt", "keep", "max_size", "seed",
    "next_seq", "rng_state",
)  # fmt: skip


def quantile_bins(scores: np.ndarray, num_quantiles: int) -> np.ndarray:
    """Bin index per score (0 = best) over all ``scores``; see the module docstring for the rule."""
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}.")
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"Quantile binning needs finite scores; row {bad} has score {float(scores[bad])!r}.")
    ascending = np.sort(scores)
    min_rank = n - np.searchsorted(ascending, scores, side="right")  # rows with a strictly higher score
    q, m = divmod(n, num_quantiles)
    big = m * (q + 1)  # positions covered by the m chunks of size q + 1
    if q == 0:
        return min_rank.astype(np.int64)
    return np.where(min_rank < big, min_rank // (q + 1), m + (min_rank - big) // q).astype(np.int64)


def quark_quantile_bins(scores: np.ndarray, num_quantiles: int, seq: np.ndarray | None = None) -> np.ndarray:
    """Quark's binning (``GXimingLu/Quark`` ``data_pool.py``): rank by score, ties by insertion order ``seq``."""
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}.")
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"Quantile binning needs finite scores; row {bad} has score {float(scores[bad])!r}.")
    seq = np.arange(n) if seq is None else np.asarray(seq)
    position = np.empty(n, dtype=np.int64)
    position[np.lexsort((seq, -scores))] = np.arange(n)
    chunk = n // num_quantiles
    if chunk == 0:
        return np.full(n, num_quantiles - 1, dtype=np.int64)
    return np.minimum(position // chunk, num_quantiles - 1)


QUANTILE_RULES = ("shared_ties", "quark")
POOL_KEEP = ("newest", "best")


@dataclass(frozen=True)
class PoolOptions:
    """The pool's choices, declared once: :class:`DataPool` checks its arguments against them and
    ``FeedbackConditionedConfig`` carries them as fields."""

    quantile_rule: str = option(
        "shared_ties",
        help="How scores become bins. 'shared_ties': equal scores share a bin (the last bins can stay empty "
        "when many samples tie at the bottom); 'quark': Quark's data_pool.py, rank order with ties in insertion "
        "order, N // K per bin and the remainder in the last bin.",
        choices=QUANTILE_RULES,
    )
    pool_keep: str = option(
        "newest", help="Which rows a full prompt keeps: 'newest' or 'best' (highest score).", choices=POOL_KEEP
    )


def _length_buckets(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket id per length on pool-wide quantile edges (exact lengths when there are few distinct ones)."""
    distinct = np.unique(lengths)
    if distinct.size <= num_buckets:
        return np.searchsorted(distinct, lengths)
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, num_buckets + 1)[1:-1]))
    return np.searchsorted(edges, lengths, side="right")


class DataPool:
    """Growing table of (prompt, completion, feedback, score, iteration, length) with ALT/Quark sampling."""

    def __init__(
        self,
        feedback_type: str = "quantile",
        num_quantiles: int = 5,
        categories: Sequence[str] | None = None,
        max_per_prompt: int | None = None,
        keep: str = "newest",
        max_size: int | None = None,
        seed: int = 0,
        quantile_rule: str = "shared_ties",
    ):
        check_option(FeedbackFormat, "feedback_type", feedback_type, label="feedback_type")
        check_option(PoolOptions, "quantile_rule", quantile_rule, label="quantile_rule")
        check_option(PoolOptions, "pool_keep", keep, label="keep")
        if feedback_type == "category" and not categories:
            raise ValueError("feedback_type='category' needs a non-empty `categories` list (best first).")
        for name, value in (("max_per_prompt", max_per_prompt), ("max_size", max_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}.")
        self.feedback_type = feedback_type
        self.num_quantiles = int(num_quantiles)
        self.quantile_rule = quantile_rule
        self.categories = list(categories or [])
        self.max_per_prompt = max_per_prompt
        self.keep = keep
        self.max_size = max_size
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._next_seq = 0
        self._prompt_codes: dict[str, int] = {}
        self.prompt_id = np.empty(0, dtype=np.int64)
        self.prompt = np.empty(0, dtype=object)
        self.completion = np.empty(0, dtype=object)
        self.feedback = np.empty(0, dtype=object)
        for name, dtype in _NUMERIC.items():
            setattr(self, name, np.empty(0, dtype=dtype))

    # ---- content -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.score.size)

    @property
    def last_iteration(self) -> int:
        """Highest iteration stored (-1 when empty): lets a resumed trainer know sampling already happened."""
        return int(self.iteration.max()) if len(self) else -1

    def add(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        feedback: Sequence[str | None] | None = None,
        scores: Sequence[float | None] | None = None,
        iteration: int = 0,
        lengths: Sequence[int] | None = None,
    ) -> None:
        """Append rows (validated: categories known, scores finite where given), then apply the size bounds."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"add(): {len(prompts)} prompts but {n} completions.")
        feedback = [None] * n if feedback is None else list(feedback)
        scores = [None] * n if scores is None else list(scores)
        lengths = [len(c) for c in completions] if lengths is None else list(lengths)
        for name, column in (("feedback", feedback), ("scores", scores), ("lengths", lengths)):
            if len(column) != n:
                raise ValueError(f"add(): {len(column)} {name} for {n} completions.")
        score_array = np.array([np.nan if s is None else s for s in scores], dtype=np.float64)
        self._validate(feedback, score_array)
        self.prompt_id = np.concatenate([self.prompt_id, self._encode_prompts(prompts)])
        self.prompt = np.concatenate([self.prompt, _object_array(prompts)])
        self.completion = np.concatenate([self.completion, _object_array(completions)])
        self.feedback = np.concatenate([self.feedback, _object_array(feedback)])
        self.score = np.concatenate([self.score, score_array])
        self.iteration = np.concatenate([self.iteration, np.full(n, iteration, dtype=np.int64)])
        self.length = np.concatenate([self.length, np.asarray(lengths, dtype=np.int64)])
        self.seq = np.concatenate([self.seq, np.arange(self._next_seq, self._next_seq + n, dtype=np.int64)])
        self._next_seq += n
        self._apply_bounds()

    def _encode_prompts(self, prompts: Sequence[Any]) -> np.ndarray:
        """Integer id per prompt (a dict lookup per *new* row; message lists are keyed by their JSON)."""
        codes = self._prompt_codes
        keys = [p if isinstance(p, str) else _json_dumps(p) for p in prompts]
        return np.array([codes.setdefault(k, len(codes)) for k in keys], dtype=np.int64)

    def _validate(self, feedback: list, scores: np.ndarray) -> None:
        finite = np.isfinite(scores)
        if self.feedback_type == "quantile" and not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"Non-finite score {float(scores[bad])!r} for row {bad}: quantile feedback needs finite scores."
            )
        given = ~np.isnan(scores)
        if (given & ~finite).any():
            bad = int(np.flatnonzero(given & ~finite)[0])
            raise ValueError(f"Non-finite score {float(scores[bad])!r} for row {bad}; scores must be finite or None.")
        if self.feedback_type == "category":
            unknown = set(feedback) - set(self.categories)
            if unknown:
                raise ValueError(
                    f"Unknown feedback category {sorted(map(repr, unknown))}; expected one of {self.categories}."
                )
        if self.feedback_type == "text" and any(not isinstance(f, str) for f in feedback):
            raise ValueError("Text feedback must be a string for every row.")

    def _apply_bounds(self) -> None:
        keep = np.ones(len(self), dtype=bool)
        if self.max_per_prompt is not None and len(self):
            prompt_ids = self.prompt_id
            key = self.seq if self.keep == "newest" else self.score
            # Sort by prompt, then best/newest first (secondary: newer first), and rank within each prompt.
            order = np.lexsort((-self.seq, -np.nan_to_num(key, nan=-np.inf), prompt_ids))
            sorted_ids = prompt_ids[order]
            starts = np.r_[0, np.flatnonzero(np.diff(sorted_ids)) + 1]
            group_start = np.repeat(starts, np.diff(np.r_[starts, sorted_ids.size]))
            rank = np.arange(sorted_ids.size) - group_start
            keep[order[rank >= self.max_per_prompt]] = False
        if self.max_size is not None and keep.sum() > self.max_size:
            kept = np.flatnonzero(keep)
            keep[kept[np.argsort(-self.seq[kept], kind="stable")[self.max_size :]]] = False
        if not keep.all():
            self._select(keep)

    def _select(self, index: np.ndarray) -> None:
        for name in ("prompt", "prompt_id", "completion", "feedback", *_NUMERIC):
            setattr(self, name, getattr(self, name)[index])

    # ---- feedback groups -----------------------------------------------------------------------------

    def bins(self) -> np.ndarray:
        """Quantile bin per row over the whole pool (0 = best); for text feedback, bins of the score."""
        if self.quantile_rule == "quark":
            return quark_quantile_bins(self.score, self.num_quantiles, self.seq)
        return quantile_bins(self.score, self.num_quantiles)

    def bin_counts(self) -> np.ndarray:
        """Rows per quantile bin (length ``num_quantiles``). Ties share a bin, so a bin can be empty: e.g. when a
        fifth of the pool or more scores the minimum, the last bin holds nothing and its token is never trained."""
        return np.bincount(self.bins(), minlength=self.num_quantiles)[: self.num_quantiles]

    def groups(self) -> np.ndarray:
        """The feedback group of each row, what balancing equalises: bin, category index or score bin."""
        if self.feedback_type == "quantile":
            return self.bins()
        if self.feedback_type == "category":
            lookup = {c: i for i, c in enumerate(self.categories)}
            return np.array([lookup[f] for f in self.feedback], dtype=np.int64)
        if np.isnan(self.score).any():
            return np.zeros(len(self), dtype=np.int64)  # unscored text: one group
        return self.bins()

    def best_text_feedback(self) -> str:
        """The exemplar feedback of a top-scoring row (ALT_LMU); the newest one on ties."""
        if len(self) == 0:
            raise ValueError("The pool is empty: no exemplar feedback yet; set best_feedback explicitly.")
        if np.isnan(self.score).all():
            raise ValueError("Text feedback without scores has no 'best' row; set best_feedback explicitly.")
        order = np.lexsort((self.seq, np.nan_to_num(self.score, nan=-np.inf)))
        return self.feedback[order[-1]]

    # ---- sampling ------------------------------------------------------------------------------------

    def length_balanced_mask(
        self, groups: np.ndarray, rng: np.random.Generator, num_length_buckets: int = 8
    ) -> np.ndarray:
        """Rejection sampling mask: kept rows have the same length distribution in every group (ALT)."""
        if len(self) == 0:
            return np.zeros(0, dtype=bool)
        buckets = _length_buckets(self.length, num_length_buckets)
        num_b = int(buckets.max()) + 1
        present = np.unique(groups)
        hist = np.zeros((int(groups.max()) + 1, num_b))
        np.add.at(hist, (groups, buckets), 1.0)
        hist = hist[present] / hist[present].sum(axis=1, keepdims=True)
        target = hist.min(axis=0)
        if target.sum() == 0:  # the groups' lengths do not overlap at all: nothing can be balanced
            return np.zeros(len(self), dtype=bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(hist > 0, target / hist, 0.0)
        accept = ratio / ratio.max(axis=1, keepdims=True)
        row_of_group = np.searchsorted(present, groups)
        return rng.random(len(self)) < accept[row_of_group, buckets]

    def sample(
        self,
        num_samples: int,
        balance: bool = True,
        balance_lengths: bool = False,
        rng: np.random.Generator | None = None,
        num_length_buckets: int = 8,
    ) -> np.ndarray:
        """Row indices of a training set of ``num_samples`` rows (balanced across feedback groups)."""
        if len(self) == 0:
            raise ValueError("Cannot sample from an empty data pool.")
        rng = self.rng if rng is None else rng
        groups = self.groups()
        candidates = np.arange(len(self))
        if balance_lengths:
            mask = self.length_balanced_mask(groups, rng, num_length_buckets)
            if mask.any():
                candidates = candidates[mask]
        if not balance:
            return rng.choice(candidates, size=num_samples, replace=num_samples > candidates.size)
        cand_groups = groups[candidates]
        order = np.argsort(cand_groups, kind="stable")
        sorted_candidates, sorted_groups = candidates[order], cand_groups[order]
        present, starts, sizes = np.unique(sorted_groups, return_index=True, return_counts=True)
        share = np.full(present.size, num_samples // present.size)
        share[rng.permutation(present.size)[: num_samples % present.size]] += 1
        picked = []
        for start, size, want in zip(starts, sizes, share):  # one iteration per group, not per row
            members = sorted_candidates[start : start + size]
            if want <= size:
                picked.append(rng.choice(members, size=want, replace=False))
            else:
                picked.append(np.concatenate([members, rng.choice(members, size=want - size, replace=True)]))
        out = np.concatenate(picked)
        return out[rng.permutation(out.size)]

    def rows(self, index: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Rows as dicts (with ``bin`` for quantile / scored-text pools), e.g. to render training examples."""
        index = np.arange(len(self)) if index is None else np.asarray(index)
        bins = self.bins() if self._has_bins() else None
        out = []
        for i in index.tolist():
            row = {
                "prompt": self.prompt[i],
                "completion": self.completion[i],
                "feedback": self.feedback[i],
                "score": float(self.score[i]),
                "iteration": int(self.iteration[i]),
                "length": int(self.length[i]),
            }
            if bins is not None:
                row["bin"] = int(bins[i])
            out.append(row)
        return out

    def _has_bins(self) -> bool:
        return len(self) > 0 and (self.feedback_type == "quantile" or not np.isnan(self.score).any())

    # ---- persistence ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "feedback_type": self.feedback_type,
            "num_quantiles": self.num_quantiles,
            "quantile_rule": self.quantile_rule,
            "categories": self.categories,
            "max_per_prompt": self.max_per_prompt,
            "keep": self.keep,
            "max_size": self.max_size,
            "seed": self.seed,
            "next_seq": self._next_seq,
            "rng_state": self.rng.bit_generator.state,
            "num_rows": len(self),
        }

    def save(self, directory: PathLike) -> None:
        """Write ``pool.parquet`` (rows) and ``pool.json`` (settings + RNG state) as one unit, with one save id."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        conversational = any(not isinstance(p, str) for p in self.prompt)  # message lists → JSON for every row
        prompts = [_json_dumps(p) for p in self.prompt] if conversational else list(self.prompt)
        table = pa.table(
            {
                "prompt": pa.array(prompts, type=pa.string()),
                "completion": pa.array(list(self.completion), type=pa.string()),
                "feedback": pa.array(list(self.feedback), type=pa.string()),
                **{name: pa.array(getattr(self, name)) for name in _NUMERIC},
            }
        )
        save_id = new_save_id()
        table = table.replace_schema_metadata({_SAVE_ID: save_id})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        meta = {**self.state_dict(), "conversational_prompts": conversational, _SAVE_ID: save_id}
        with atomic_files(directory / POOL_TABLE, directory / POOL_META) as (table_tmp, meta_tmp):  # both or neither
            table_tmp.write_bytes(buffer.getvalue())
            write_json(meta_tmp, meta)

    @classmethod
    def load(cls, directory: PathLike) -> DataPool:
        """Inverse of :meth:`save`: same rows, settings and RNG state."""
        import pyarrow.parquet as pq

        directory = Path(directory)
        meta = read_json(directory / POOL_META)
        require_keys(meta, _META_KEYS, directory / POOL_META)
        path = directory / POOL_TABLE
        if not path.exists():
            raise FileNotFoundError(f"Expected the data pool table at {str(path)!r}, but it does not exist.")
        arrow_table = pq.read_table(path)
        stored = {k.decode(): v.decode() for k, v in (arrow_table.schema.metadata or {}).items()}
        check_same_save(path, directory / POOL_META, meta.get(_SAVE_ID), metadata=stored)
        table = arrow_table.to_pydict()
        require_keys(table, ("prompt", "completion", "feedback", *_NUMERIC), path, what="column")
        if len(table["score"]) != meta["num_rows"]:
            raise ValueError(f"{str(path)!r} has {len(table['score'])} rows but {POOL_META} says {meta['num_rows']}.")
        pool = cls(
            feedback_type=meta["feedback_type"],
            num_quantiles=meta["num_quantiles"],
            categories=meta["categories"],
            max_per_prompt=meta["max_per_prompt"],
            keep=meta["keep"],
            max_size=meta["max_size"],
            seed=meta["seed"],
            quantile_rule=meta.get("quantile_rule", "shared_ties"),  # pools saved before the option existed
        )
        prompts = table["prompt"]
        if meta.get("conversational_prompts"):
            import json

            prompts = [json.loads(p) for p in prompts]
        pool.prompt = _object_array(prompts)
        pool.prompt_id = pool._encode_prompts(prompts)
        pool.completion = _object_array(table["completion"])
        pool.feedback = _object_array(table["feedback"])
        for name, dtype in _NUMERIC.items():
            setattr(pool, name, np.asarray(table[name], dtype=dtype))
        pool._next_seq = meta["next_seq"]
        pool.rng.bit_generator.state = meta["rng_state"]
        return pool


def _object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    if len(values) and isinstance(values[0], (list, tuple, dict)):
        for i, value in enumerate(values):  # nested values: assign one by one so numpy does not broadcast
            out[i] = value
    else:
        out[:] = list(values)
    return out


def _json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))
