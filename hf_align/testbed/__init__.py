"""Offline testbed: a tiny pre-trained Llama, its tokenizer, a task with a programmatic reward.

>>> from hf_align import testbed
>>> tb = testbed.load()
>>> tb.reward(["2+3="], ["5"])
[1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_align.testbed.data import forget_dataset, preference_dataset, prompt_dataset, retain_dataset, sft_dataset
from hf_align.testbed.evaluation import generate_completions, mean_reward
from hf_align.testbed.task import FORGET_MARKER, has_forget_behaviour, reward, score, solve, token_correctness


MODEL_DIR = Path(__file__).resolve().parent / "assets" / "model"
"""Where the shipped model and tokenizer live (a normal HF folder: ``from_pretrained(MODEL_DIR)`` works)."""


@dataclass
class Testbed:
    """Everything a test, doc snippet or benchmark needs: model, tokenizer, data and reward."""

    model: Any
    tokenizer: Any
    path: str
    reward: Any = staticmethod(reward)

    sft_dataset = staticmethod(sft_dataset)
    preference_dataset = staticmethod(preference_dataset)
    prompt_dataset = staticmethod(prompt_dataset)
    forget_dataset = staticmethod(forget_dataset)
    retain_dataset = staticmethod(retain_dataset)

    def mean_reward(self, model=None, **kwargs) -> dict:
        return mean_reward(model if model is not None else self.model, self.tokenizer, **kwargs)


def load_tokenizer(path: str | Path = MODEL_DIR):
    from hf_align.loading import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


def load(dtype: Any = None, path: str | Path = MODEL_DIR) -> Testbed:
    """Load the shipped model (fp32 unless ``dtype`` is given) and tokenizer; never touches the network."""
    import torch

    from hf_align.loading import load_model

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The testbed model is missing at {path}: rebuild it with `python scripts/build_testbed.py`."
        )
    model = load_model(path, dtype=dtype or torch.float32)
    model.eval()
    return Testbed(model=model, tokenizer=load_tokenizer(path), path=str(path))


_RANDOM_TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def load_random_tiny(
    architecture: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
    **config_overrides: Any,
):
    """A randomly initialised tiny causal LM for shape-only unit tests (vocab of the testbed tokenizer).

    ``architecture`` is one of ``llama``, ``mistral``, ``qwen2``, ``qwen3``.
    """
    import torch
    import transformers

    if architecture not in _RANDOM_TINY_CONFIGS:
        raise ValueError(f"Unknown architecture {architecture!r}; choose one of {sorted(_RANDOM_TINY_CONFIGS)}.")
    config_name, model_name, extra = _RANDOM_TINY_CONFIGS[architecture]
    tokenizer = load_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **{"tie_word_embeddings": False, **extra, **config_overrides},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.eval()
    return model


QUIET_TRAINING_ARGS: dict[str, Any] = dict(
    report_to="none", save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, dataloader_num_workers=0
)
"""What :func:`quiet_training_args` sets."""


def quiet_training_args(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for any ``TrainingArguments`` subclass (TRL's configs, ours) for a short run on the CPU that
    writes and prints only what it is asked to: no logging integration, no checkpoints, fp32 (TRL's configs default
    to bf16 autocast), no progress bars, no dataloader workers. ``overrides`` win, e.g.
    ``MaskedDPOConfig(**quiet_training_args(output_dir=out, max_steps=2))``.

    Here, beside the testbed, because tests, docs snippets and benchmarks all run on it and import it; the library
    itself never does.
    """
    return {**QUIET_TRAINING_ARGS, **overrides}


__all__ = [
    "FORGET_MARKER",
    "MODEL_DIR",
    "QUIET_TRAINING_ARGS",
    "Testbed",
    "forget_dataset",
    "generate_completions",
    "has_forget_behaviour",
    "load",
    "load_random_tiny",
    "load_tokenizer",
    "mean_reward",
    "preference_dataset",
    "prompt_dataset",
    "quiet_training_args",
    "retain_dataset",
    "reward",
    "score",
    "sft_dataset",
    "solve",
    "token_correctness",
]
