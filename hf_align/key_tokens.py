"""Key-token labeling: which tokens of a bad response make it bad (the ``*_weights`` columns ALLO's forgetting needs).

Three ways, each returning one float per completion token **under the trainer's tokenization** (the conventions of
:mod:`hf_align.token_weights`: EOS / chat-template tokens included):

1. :func:`rewrite_diff_weights` -- RLMEC's minimal-edit idea: diff the response against its corrected rewrite at the
   token level; tokens the rewrite deletes or replaces are key (``key``), kept tokens get ``floor``.
2. :class:`GenerativeScorer` -- ALLO's generative reward model (``preprocess/gen_forgetting_data/gen_tlr.py``):
   teacher-force the response through a causal LM prompted to minimally correct it; tokens it would not keep
   (probability below ``threshold``, or the lowest ``lowest_fraction``) are key.
3. :func:`callable_weights` -- any ``(prompt, response) -> list[float]``.

:func:`label_dataset` maps any of them over a dataset (``datasets.map``: cached, so an interrupted run resumes).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_align.token_weights import _completion_token_char_ranges


ALLO_CORRECTION_TEMPLATE = (
    "Given the problem and the correct solution, you need to correct the mistakes in the prediction to get the "
    "correct answer. You should write down the correct prediction and use 'The answer is: ' (without quotation mark) "
    "to identify the final answer. You should make minimal modifications. You should not copy the problem.\n\n"
    "### Problem:\n{problem}\n\n"
    "### Correct solution:\n{solution}\n\n"
    "### Prediction:\n{prediction}\n\n"
    "### Correct prediction:\n"
)
"""ALLO's minimal-edit correction prompt (gen_tlr.py's ``REWARD_PROMPT``) with named fields."""


def _text(value) -> str:
    """The text of a completion: a string, or the last message's content for conversational data."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return value[-1]["content"]
    raise ValueError(f"Expected a string or a list of messages, got {type(value).__name__}: {value!r}.")


def completion_token_ids(tokenizer, prompt, completion, add_eos: bool = True) -> list[int]:
    """The completion tokens exactly as the DPO/SFT/NPO trainers tokenize them (EOS / template tokens included)."""
    ids, _ = _completion_token_char_ranges(tokenizer, prompt, completion, add_eos)
    return ids


# --------------------------------------------------------------------------------------------------------------
# 1. Rewrite diff


def rewrite_diff_weights(
    tokenizer,
    prompt,
    response,
    rewrite,
    *,
    key: float = 1.0,
    floor: float = 0.0,
    alignment: str = "auto",
    mark_insertions: bool = False,
    add_eos: bool = True,
) -> list[float]:
    """Token weights of ``response``: ``key`` where its corrected ``rewrite`` deletes or replaces it, else ``floor``.

    ``alignment``: ``"diff"`` aligns the two token sequences with ``difflib`` (longest matching blocks: a minimal
    edit script of insertions, deletions and replacements); ``"positional"`` compares token ``i`` with token ``i``
    (for rewrites that only substitute tokens; needs equal lengths); ``"auto"`` (default) is positional when both
    have the same number of tokens -- a same-length minimal edit is a substitution, and a diff could otherwise
    explain it as a shift -- and ``"diff"`` otherwise. ``mark_insertions`` also marks the response token right
    after a point where the rewrite inserts tokens (the first token generated without the missing piece).
    """
    if alignment not in ("auto", "diff", "positional"):
        raise ValueError(f"alignment must be 'auto', 'diff' or 'positional', got {alignment!r}.")
    a = completion_token_ids(tokenizer, prompt, response, add_eos)
    b = completion_token_ids(tokenizer, prompt, rewrite, add_eos)
    if alignment == "positional" and len(a) != len(b):
        raise ValueError(
            f"alignment='positional' needs a response and rewrite of equal token length, got {len(a)} and {len(b)}."
        )
    if alignment == "positional" or (alignment == "auto" and len(a) == len(b)):
        return [float(floor if x == y else key) for x, y in zip(a, b, strict=True)]
    weights = [float(floor)] * len(a)
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            weights[i1:i2] = [float(key)] * (i2 - i1)
        elif tag == "insert" and mark_insertions and i1 < len(a):
            weights[i1] = float(key)
    return weights


# --------------------------------------------------------------------------------------------------------------
# 2. Generative reward model


def select_key_tokens(
    probs: Sequence[float],
    *,
    threshold: float | None = 0.5,
    lowest_fraction: float | None = None,
    key: float = 1.0,
    floor: float = 0.0,
    scorable: Sequence[bool] | None = None,
) -> list[float]:
    """Key tokens from per-token keep-probabilities: below ``threshold``, or the ``lowest_fraction`` lowest.

    ``lowest_fraction`` takes ``max(1, round(fraction · n))`` of the ``n`` scorable tokens (ties at the cut are
    included); exactly one of the two criteria must be set. Tokens with ``scorable`` False get ``floor``.
    """
    if (threshold is None) == (lowest_fraction is None):
        raise ValueError("Set exactly one of threshold and lowest_fraction.")
    scorable = [True] * len(probs) if scorable is None else list(scorable)
    if threshold is not None:
        return [float(key if ok and p < threshold else floor) for p, ok in zip(probs, scorable, strict=True)]
    if not 0.0 < lowest_fraction <= 1.0:
        raise ValueError(f"lowest_fraction must be in (0, 1], got {lowest_fraction}.")
    values = sorted(p for p, ok in zip(probs, scorable, strict=True) if ok)
    if not values:
        return [float(floor)] * len(probs)
    k = max(1, round(lowest_fraction * len(values)))
    cut = values[k - 1]
    return [float(key if ok and p <= cut else floor) for p, ok in zip(probs, scorable, strict=True)]


class GenerativeScorer:
    """ALLO's token-level reward: how likely a correcting LM is to keep each token of a wrong response.

    The scorer sees ``template`` filled with ``problem`` (the prompt), ``solution`` (a reference answer) and
    ``prediction`` (the response), and is teacher-forced on the response itself; ``p_t`` is the probability it gives
    each original token. Scorer tokens are mapped to the trainer's tokens by character offsets (a trainer token's
    probability is the lowest among the scorer tokens overlapping it), so the scorer may use another tokenizer.
    Tokens outside the response text (EOS, template tokens) get ``floor``.

    ``selection``: ``"threshold"`` (key if ``p_t < threshold``, default 0.5 as in the ALLO paper), ``"lowest"``
    (the ``lowest_fraction`` least likely tokens), or ``"probability"`` (the weight is ``p_t`` itself, what ALLO's
    released ``gen_tlr.py`` stores -- its thresholding line is commented out).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = ALLO_CORRECTION_TEMPLATE,
        selection: str = "threshold",
        threshold: float = 0.5,
        lowest_fraction: float = 0.2,
        key: float = 1.0,
        floor: float = 0.0,
        batch_size: int = 8,
        max_length: int | None = None,
    ):
        if selection not in ("threshold", "lowest", "probability"):
            raise ValueError(f"selection must be 'threshold', 'lowest' or 'probability', got {selection!r}.")
        for name in ("problem", "prediction"):
            if "{" + name + "}" not in template:
                raise ValueError(f"template must contain the field {{{name}}}; got {template!r}.")
        if isinstance(model, str):
            from hf_align.loading import load_model

            model = load_model(model)
        if isinstance(tokenizer, str):
            from hf_align.loading import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("GenerativeScorer needs a fast tokenizer (character offsets) for the scorer.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.selection = template, selection
        self.threshold, self.lowest_fraction = threshold, lowest_fraction
        self.key, self.floor, self.batch_size, self.max_length = key, floor, batch_size, max_length

    def scorer_text(self, problem: str, prediction: str, solution: str = "") -> str:
        return self.template.format(problem=problem, solution=solution, prediction=prediction)

    @torch.no_grad()
    def char_probabilities(self, items: Sequence[tuple[str, str, str]]) -> list[list[tuple[int, int, float]]]:
        """For each ``(problem, prediction, solution)``: the scorer's ``(start, end, p)`` per prediction token."""
        texts, starts = [], []
        for problem, prediction, solution in items:
            context = self.scorer_text(problem, prediction, solution)
            texts.append(context + prediction)
            starts.append(len(context))
        encoded = self.tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
        results = []
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for lo in range(0, len(texts), self.batch_size):
            ids = encoded["input_ids"][lo : lo + self.batch_size]
            if self.max_length is not None:
                ids = [row[-self.max_length :] for row in ids]
            width = max(len(row) for row in ids)
            input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for i, row in enumerate(ids):
                input_ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1))
            probs = logp.squeeze(-1).exp().cpu()
            for i, row in enumerate(ids):
                offsets = encoded["offset_mapping"][lo + i][-len(row) :]
                start = starts[lo + i]
                spans = []
                for j in range(1, len(row)):
                    s, e = offsets[j]
                    if e > start and e > s:
                        spans.append((max(s, start) - start, e - start, float(probs[i, j - 1])))
                results.append(spans)
        return results

    def weights(self, tokenizer, prompt, response, solution: str = "", add_eos: bool = True) -> list[float]:
        """One example's weights under the trainer's ``tokenizer`` (see :meth:`batch_weights`)."""
        return self.batch_weights(tokenizer, [prompt], [response], [solution], add_eos=add_eos)[0]

    def batch_weights(self, tokenizer, prompts, responses, solutions=None, add_eos: bool = True) -> list[list[float]]:
        """Weights for a batch of responses (one scorer forward per ``batch_size`` examples)."""
        solutions = solutions if solutions is not None else [""] * len(prompts)
        items = [(_text(p), _text(r), _text(s) if s else "") for p, r, s in zip(prompts, responses, solutions)]
        char_probs = self.char_probabilities(items)
        out = []
        for prompt, response, spans in zip(prompts, responses, char_probs, strict=True):
            _, ranges = _completion_token_char_ranges(tokenizer, prompt, response, add_eos)
            probs, scorable = [], []
            for token_range in ranges:
                overlapping = [
                    p
                    for s, e, p in spans
                    if token_range is not None and min(e, token_range[1]) > max(s, token_range[0])
                ]
                probs.append(min(overlapping) if overlapping else 1.0)
                scorable.append(bool(overlapping))
            if self.selection == "probability":
                out.append([float(p) if ok else float(self.floor) for p, ok in zip(probs, scorable)])
            else:
                out.append(
                    select_key_tokens(
                        probs,
                        threshold=self.threshold if self.selection == "threshold" else None,
                        lowest_fraction=self.lowest_fraction if self.selection == "lowest" else None,
                        key=self.key,
                        floor=self.floor,
                        scorable=scorable,
                    )
                )
        return out


# --------------------------------------------------------------------------------------------------------------
# 3. Any callable


def callable_weights(fn: Callable[[Any, Any], Sequence[float]], tokenizer, prompt, response) -> list[float]:
    """``fn(prompt, response)`` checked: one finite non-negative float per completion token of the trainer."""
    from hf_align.rewards import call_user_function, function_label
    from hf_align.token_weights import normalize_token_weights

    ids = completion_token_ids(tokenizer, prompt, response)
    weights = call_user_function(fn, "labeling function", prompt, response)  # raises: one line naming module:function
    column = f"weights returned by the labeling function {function_label(fn)!r}"
    return normalize_token_weights(weights, ids, column=column, row=0, eos_token_id=None)


# --------------------------------------------------------------------------------------------------------------
# Datasets


def label_dataset(
    dataset,
    tokenizer,
    method: str | Callable = "rewrite_diff",
    *,
    response_column: str = "rejected",
    rewrite_column: str = "chosen",
    solution_column: str | None = "chosen",
    output_column: str | None = None,
    scorer: GenerativeScorer | None = None,
    batch_size: int = 8,
    num_proc: int | None = None,
    **options,
):
    """Add ``{response_column}_weights`` (or ``output_column``) to ``dataset`` with ``datasets.map``.

    ``method``: ``"rewrite_diff"`` (``rewrite_column`` is the corrected rewrite; ``options`` go to
    :func:`rewrite_diff_weights`), ``"generative"`` (needs ``scorer``; ``solution_column`` fills the template's
    ``{solution}``) or a callable ``(prompt, response) -> list[float]``. ``datasets`` caches each map by
    fingerprint, so re-running an interrupted labeling of a cached dataset resumes from the cache.
    """
    output_column = output_column or f"{response_column}_weights"
    names = dataset.column_names
    needed = ["prompt", response_column] + ([rewrite_column] if method == "rewrite_diff" else [])
    if method == "generative" and solution_column:
        needed.append(solution_column)
    missing = [c for c in needed if c not in names]
    if missing:
        raise ValueError(f"label_dataset: missing column(s) {missing}; found {names}.")

    if method == "rewrite_diff":

        def fn(example):
            w = rewrite_diff_weights(
                tokenizer, example["prompt"], example[response_column], example[rewrite_column], **options
            )
            return {output_column: w}

        return dataset.map(fn, num_proc=num_proc, desc="Labeling key tokens (rewrite diff)")
    if method == "generative":
        if scorer is None:
            raise ValueError("method='generative' needs a GenerativeScorer (scorer=...).")

        def batch_fn(batch):
            sols = batch[solution_column] if solution_column else None
            w = scorer.batch_weights(tokenizer, batch["prompt"], batch[response_column], sols)
            return {output_column: w}

        return dataset.map(batch_fn, batched=True, batch_size=batch_size, desc="Labeling key tokens (scorer)")
    if callable(method):

        def call_fn(example):
            return {output_column: callable_weights(method, tokenizer, example["prompt"], example[response_column])}

        return dataset.map(call_fn, num_proc=num_proc, desc="Labeling key tokens")
    raise ValueError(f"method must be 'rewrite_diff', 'generative' or a callable, got {method!r}.")
