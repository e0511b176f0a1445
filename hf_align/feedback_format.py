"""How feedback conditions a prompt (ALT / Quark): quantile tokens or words, categories, free text, templates.

One home for the conditioning format, so the trainer, its ``generate`` and anything that renders prompts for a
trained model (an evaluation, a demo) build the same strings: :class:`FeedbackFormat` renders feedback and
prompts, :func:`add_quantile_tokens` gives the quantile tokens embedding rows the model can learn.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from hf_align.config_checks import AT_LEAST_ONE, check_config_values, option
from hf_align.rewards import as_score


FEEDBACK_TYPES = ("quantile", "category", "text")

__all__ = ["FEEDBACK_TYPES", "FeedbackFormat", "add_quantile_tokens"]


@dataclass(frozen=True)
class FeedbackFormat:
    """The conditioning format, declared once: ``FeedbackConditionedConfig`` carries these fields (same names,
    defaults, help and choices) and the trainer builds its format from them (:meth:`from_args`)."""

    feedback_type: str = option(
        "quantile",
        help="'quantile' (Quark / ALT_RM: rewards → bins), 'category' (ALT_LMC) or 'text' (ALT_LMU).",
        choices=FEEDBACK_TYPES,
    )
    num_quantiles: int = option(
        5, help="Number of quantile bins K over the whole data pool (bin 0 = best).", range=AT_LEAST_ONE
    )
    quantile_token_format: str = option(
        "<|quantile_{i}|>",
        help="Special token of bin i (added to the tokenizer; embeddings resized, new rows = mean row).",
    )
    quantile_words: list[str] | None = option(
        None,
        help="Render bins as words instead of tokens (ALT_RM), best first, one per bin, e.g. "
        "['Excellent.', 'Good.', 'Average.', 'Bad.', 'Terrible.']. No tokens are added then.",
    )
    categories: list[str] | None = option(
        None, help="Allowed categories for feedback_type='category', listed best first."
    )
    best_feedback: str | None = option(
        None,
        help="Feedback that sampling and inference condition on. Default: bin 0 (quantile), categories[0] "
        "(category), the feedback of the top-scoring pool row (text).",
    )
    feedback_template: str = option(
        "{feedback} input: {prompt}",
        help="How feedback and a plain-text prompt are joined (ALT: '{feedback} input: {prompt}').",
    )
    unconditioned_template: str | None = option(
        None,
        help="Prompt without feedback (first-iteration sampling, reference model input). Default: "
        "feedback_template with '{feedback}' removed and leading whitespace stripped.",
    )
    chat_feedback_template: str = option(
        "{feedback} {prompt}",
        help="For conversational prompts: new content of the last user message ('{prompt}' = its content); "
        "the tokenizer's chat template is applied afterwards.",
    )

    def __post_init__(self):
        check_config_values(self)  # every field's type, choices and range, as declared above
        if self.quantile_words is not None and len(self.quantile_words) != self.num_quantiles:
            raise ValueError(
                f"quantile_words has {len(self.quantile_words)} entries but num_quantiles is {self.num_quantiles}."
            )
        quantile_tokens = self.feedback_type == "quantile" and self.quantile_words is None
        if quantile_tokens and "{i}" not in self.quantile_token_format:
            raise ValueError(
                f"quantile_token_format must contain '{{i}}' (the bin), got {self.quantile_token_format!r}: every "
                "bin would get the same token."
            )
        if self.feedback_type == "category" and not self.categories:
            raise ValueError("feedback_type='category' needs `categories` (the allowed values, best first).")
        if "{prompt}" not in self.feedback_template or "{feedback}" not in self.feedback_template:
            raise ValueError(
                f"feedback_template must contain '{{feedback}}' and '{{prompt}}', got {self.feedback_template!r}."
            )
        if "{prompt}" not in self.chat_feedback_template:
            raise ValueError(f"chat_feedback_template must contain '{{prompt}}', got {self.chat_feedback_template!r}.")

    @classmethod
    def from_args(cls, args: Any) -> FeedbackFormat:
        """The format of a config (any object with the fields' names as attributes)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @property
    def tokens(self) -> list[str]:
        """The special tokens the format needs in the tokenizer (quantile bins rendered as tokens; else none)."""
        if self.feedback_type != "quantile" or self.quantile_words is not None:
            return []
        return [self.quantile_token_format.format(i=i) for i in range(self.num_quantiles)]

    def quantile(self, index: int) -> str:
        """The feedback string of quantile bin ``index`` (0 = best)."""
        if not 0 <= index < self.num_quantiles:
            raise ValueError(f"Quantile bin {index} is outside 0..{self.num_quantiles - 1}.")
        if self.quantile_words is not None:
            return self.quantile_words[index]
        return self.quantile_token_format.format(i=index)

    def label(self, row_or_bin: dict | int) -> str:
        """The feedback string of a data-pool row (or of a quantile bin index)."""
        if isinstance(row_or_bin, int | np.integer):
            return self.quantile(int(row_or_bin))
        if self.feedback_type == "quantile":
            return self.quantile(row_or_bin["bin"])
        return row_or_bin["feedback"]

    def best(self, pool) -> str:
        """What sampling and inference condition on: ``best_feedback``, bin 0, the first category, or the
        feedback of the pool's top-scoring row (text)."""
        if self.best_feedback is not None:
            return self.best_feedback
        if self.feedback_type == "quantile":
            return self.quantile(0)
        if self.feedback_type == "category":
            return self.categories[0]
        return pool.best_text_feedback()

    def render(self, prompt: str | list[dict], feedback: str | None, tokenizer) -> str:
        """Conditioned prompt text (``feedback=None``: the unconditioned form, as the reference sees it).

        Conversational prompts get the feedback in their last user message, then the chat template (with the
        generation prompt); plain-text prompts go through ``feedback_template`` / ``unconditioned_template``.
        """
        if isinstance(prompt, list):
            messages = copy.deepcopy(prompt)
            if feedback is not None:
                last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
                content = messages[last_user]["content"]
                messages[last_user]["content"] = self.chat_feedback_template.format(feedback=feedback, prompt=content)
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if feedback is None:
            template = self.unconditioned_template or self.feedback_template.replace("{feedback}", "").lstrip()
            return template.format(prompt=prompt)
        return self.feedback_template.format(feedback=feedback, prompt=prompt)

    def conditioning(self, feedback: str | int | list | None, pool) -> str | list[str]:
        """``generate``'s feedback as strings: ``None`` → :meth:`best`, an int → that quantile bin.

        A bin no pool row is in uses a token that never got a training signal: that is a warning.
        """
        if feedback is None:
            feedback = self.best(pool)
        items = feedback if isinstance(feedback, list) else [feedback]
        bins = [int(f) for f in items if isinstance(f, int | np.integer)]
        if self.feedback_type == "quantile" and len(pool) and bins:
            counts = pool.bin_counts()
            empty = sorted({b for b in bins if 0 <= b < counts.size and counts[b] == 0})
            if empty:
                warnings.warn(
                    f"Quantile bin(s) {empty} hold no pool rows (tied scores share a bin; rows per bin: "
                    f"{counts.tolist()}), so conditioning on them uses untrained feedback. For the worst feedback "
                    f"the pool has seen, use bin {int(np.flatnonzero(counts)[-1])}.",
                    stacklevel=3,
                )
        labels = [self.label(f) if isinstance(f, int | np.integer) else f for f in items]
        return labels if isinstance(feedback, list) else labels[0]

    def parse(self, value: Any, index: int, source: str) -> tuple[str, float | None]:
        """A feedback function's category/text output, optionally ``(label, score)``, checked."""
        label, score = (value[0], value[1]) if isinstance(value, tuple | list) and len(value) == 2 else (value, None)
        score = as_score(score, index, source, allow_none=True)
        if not isinstance(label, str):
            raise ValueError(
                f"{source} returned {value!r} for completion {index}; expected a string or (string, score)."
            )
        if self.feedback_type == "category" and label not in self.categories:
            raise ValueError(
                f"{source} returned unknown category {label!r} for completion {index}; expected one of "
                f"{self.categories}."
            )
        return label, score


def add_quantile_tokens(model, tokenizer, tokens: list[str], seed: int, peft: bool = False) -> list[str]:
    """Add ``tokens`` as special tokens and initialise their embedding rows (input and output).

    A new row is the mean of the existing rows plus seeded noise with the existing rows' per-dimension
    standard deviation: inside the distribution the model knows (like transformers' ``mean_resizing``),
    yet different per bin, so the bins are distinguishable from the first forward pass. A new token in
    front of the prompt is still a context the model never saw: on the testbed model it alone lowers
    the reward from ~0.37 to ~0.24 (zero, mean or copied rows do no better), and training has to win
    that back before the conditioning pays (see docs/feedback.md).
    """
    from accelerate.utils import is_peft_model

    if not tokens:
        return []
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    embedding = model.get_input_embeddings()  # its row count, not the weight's shape: ZeRO-3 partitions the weight
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    # A tokenizer that already has the tokens (e.g. saved by an earlier run) with a model that lacks their rows.
    unbacked = [t for t in tokens if t not in missing and tokenizer.convert_tokens_to_ids(t) >= rows]
    if not missing and not unbacked:
        return tokens
    if peft or is_peft_model(model):
        raise ValueError(
            f"Quantile tokens {missing} are not in the tokenizer, and a PEFT model cannot learn new embedding rows: "
            "add them (and make the embeddings trainable) before wrapping, or use `quantile_words`."
        )
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            f"Quantile tokens {missing + unbacked} cannot be added under DeepSpeed ZeRO-3 (the embeddings are "
            "partitioned at load): use `quantile_words`, or add the tokens before sharding "
            "(hf_align.feedback_format.add_quantile_tokens on the loaded model, then save model and tokenizer)."
        )
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    new_ids = tokenizer.convert_tokens_to_ids(missing + unbacked)
    if max(new_ids) >= rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embeddings = [model.get_input_embeddings()]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not embeddings[0].weight:
            embeddings.append(output)
        old = min(min(new_ids), rows)
        generator = torch.Generator().manual_seed(seed)
        for module in embeddings:
            existing = module.weight[:old].float()
            noise = torch.randn(len(new_ids), existing.shape[1], generator=generator).to(existing.device)
            new_rows = existing.mean(dim=0) + noise * existing.std(dim=0)
            module.weight[new_ids] = new_rows.to(module.weight.dtype)
            if getattr(module, "bias", None) is not None and module.bias.shape[0] > max(new_ids):
                module.bias[new_ids] = module.bias[:old].mean()
    return tokens
