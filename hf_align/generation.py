"""Seeded sampling, written once: ``hf-align eval``, the feedback trainer (HF path) and the testbed use it.

Same seed, model and prompts ⇒ the same completions; the caller's RNG state (CPU and CUDA) is left as it
was, so sampling in the middle of training or a test does not shift any later random draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from trl.trainer.utils import pad

from hf_align.progress import progress_bar


__all__ = ["generate_texts", "sample", "sample_ids", "sample_token_ids", "seeded", "until_eos", "vllm_generation"]


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """``torch.manual_seed(seed)`` inside; the CPU RNG and the CUDA RNG of ``device`` (a CUDA device; else the
    current one, where CUDA is available) restored in ``finally``, also when the body raises."""
    device = torch.device(device) if device is not None else None
    cuda_index = None
    if torch.cuda.is_available():  # manual_seed seeds CUDA too (lazily, if it is not up yet): save it either way
        on_cuda = device is not None and device.type == "cuda" and device.index is not None
        cuda_index = device.index if on_cuda else torch.cuda.current_device()
    cpu_state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(cuda_index) if cuda_index is not None else None
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, cuda_index)


def until_eos(ids: list[int], eos: int, pad_id: int) -> list[int]:
    """Generated ids up to and including the first EOS, padding removed."""
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    return [i for i in ids if i != pad_id or i == eos]


@torch.no_grad()
def sample_token_ids(
    model,
    prompt_ids: Sequence[list[int]],
    pad_token_id: int,
    eos_token_id: int,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    do_sample: bool = True,
    temperature: float | None = 1.0,
    top_p: float | None = 1.0,
    top_k: int | None = 0,
    max_new_tokens: int = 64,
    progress: bool = False,
    desc: str = "sampling",
    **generate_kwargs: Any,
) -> list[list[int]]:
    """Completion ids (up to and including EOS) for each prompt, left-padded batches, seeded once for all.

    Greedy decoding (``do_sample=False``) drops the sampling settings, so ``generate`` does not warn about them.
    ``progress``: a bar (``desc``, one step per prompt) that goes away when done (it runs inside training loops).
    """
    if not do_sample:
        temperature = top_p = top_k = None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    bar = progress_bar(desc=desc, unit="prompt", total=len(prompt_ids), enabled=progress, leave=False)
    try:
        with seeded(seed, device), bar:
            for start in range(0, len(prompt_ids), batch_size):
                chunk = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids[start : start + batch_size]]
                input_ids = pad(chunk, padding_value=pad_token_id, padding_side="left").to(device)
                mask = pad([torch.ones_like(t) for t in chunk], padding_value=0, padding_side="left").to(device)
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                    **generate_kwargs,
                )
                out.extend(
                    until_eos(row, eos_token_id, pad_token_id) for row in generated[:, input_ids.shape[1] :].tolist()
                )
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return out


def generate_texts(
    model, tokenizer, prompts: Sequence[str], seed: int = 0, batch_size: int = 64, **kwargs: Any
) -> list[str]:
    """Decoded completions (special tokens removed) of text prompts, tokenized without special tokens."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = sample_token_ids(
        model, prompt_ids, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=seed, batch_size=batch_size, **kwargs
    )
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def sample_ids(
    model,
    tokenizer,
    prompts: Sequence[str],
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "sampling",
) -> list[list[int]]:
    """Completion ids (up to and including EOS) for ``prompts`` (text), batch ``i`` drawn with seed ``seed + i``:
    same seed ⇒ same samples, whatever else runs before (``hf-align eval``'s protocol)."""
    out: list[list[int]] = []
    with progress_bar(desc=desc, unit="prompt", total=len(prompts), enabled=progress) as bar:
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
            out.extend(
                sample_token_ids(
                    model, chunk, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=seed + i,
                    batch_size=batch_size, do_sample=do_sample, temperature=temperature, max_new_tokens=max_new_tokens,
                )
            )  # fmt: skip
            bar.update(len(chunk))
    return out


def sample(model, tokenizer, prompts: Sequence[str], **kwargs: Any) -> list[str]:
    """The decoded completions (special tokens removed) of :func:`sample_ids`, same arguments."""
    return tokenizer.batch_decode(sample_ids(model, tokenizer, prompts, **kwargs), skip_special_tokens=True)


def vllm_generation(model, accelerator, processing_class, args: Any):
    """TRL's ``VLLMGeneration`` for a config with ``vllm_mode``, ``vllm_gpu_memory_utilization``,
    ``generation_batch_size`` and the sampling fields; a clear ``ImportError`` without vLLM."""
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ImportError(
            "use_vllm=True needs vLLM, which is not installed: `pip install vllm` (or set use_vllm=False)."
        )
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(
        model=model,
        accelerator=accelerator,
        processing_class=processing_class,
        mode=args.vllm_mode,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_num_seqs=args.generation_batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p or 0.0,
        repetition_penalty=args.repetition_penalty,
        max_completion_length=args.max_completion_length,
        generation_kwargs=args.generation_kwargs,
        logprobs=None,
    )
