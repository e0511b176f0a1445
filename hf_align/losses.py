"""The losses of hf-align's trainers as pure functions on per-token log-probs, so each can be tested against its
formula alone. Shapes ``(B, T)``, zero outside the completion, unless said otherwise.

* NPO (Zhang et al. 2024, arXiv 2404.05868): :func:`npo_sequence_loss`; ALLO's token-level form :func:`npo_token_loss`;
  SimNPO (Fan et al. 2024, arXiv 2410.07163): :func:`simnpo_loss`.
* Retain terms of the unlearning trainers: :func:`retain_nll`, :func:`retain_kl`.
* The feedback-conditioned trainer's KL to its reference: :func:`token_kl`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ["npo_sequence_loss", "npo_token_loss", "retain_kl", "retain_nll", "simnpo_loss", "token_kl"]


def npo_sequence_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, weights: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example NPO loss ``−(2/β) log σ(−β r)`` and the weighted log-ratio ``r = Σ_t w_t (log πθ − log π_ref)``."""
    logratio = ((policy_logps - ref_logps) * weights).sum(dim=-1)
    return -(2.0 / beta) * F.logsigmoid(-beta * logratio), logratio


def npo_token_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """ALLO's token-level NPO: ``Σ_t −w_t log σ(−β (log πθ − log π_ref)) / #{t : w_t ≠ 0}`` over the whole batch.

    ``count`` replaces the batch's own ``#{t : w_t ≠ 0}`` (several processes: the tokens of every process over
    their number, so the average over processes is the one-process mean)."""
    per_token = -weights * F.logsigmoid(-beta * (policy_logps - ref_logps))
    return per_token.sum() / (count if count is not None else (weights != 0).sum().clamp(min=1))


def simnpo_loss(policy_logps: torch.Tensor, weights: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Per-example SimNPO loss ``−(2/β) log σ(−(β/|y|) Σ_t w_t log πθ − γ)``, ``|y| = Σ_t w_t``."""
    length = weights.sum(dim=-1).clamp(min=torch.finfo(policy_logps.dtype).tiny)
    avg_logp = (policy_logps * weights).sum(dim=-1) / length
    return -(2.0 / beta) * F.logsigmoid(-beta * avg_logp - gamma)


def retain_nll(log_probs: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per retain completion token (``count``: as in :func:`npo_token_loss`)."""
    return -(log_probs * mask).sum() / (count if count is not None else mask.sum().clamp(min=1))


def retain_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(π_ref ‖ πθ)`` over the vocabulary, mean over the positions where ``mask`` is 1 (``count``: as in
    :func:`npo_token_loss`)."""
    ref_logp = ref_logits.float().log_softmax(dim=-1)
    policy_logp = policy_logits.float().log_softmax(dim=-1)
    kl = (ref_logp.exp() * (ref_logp - policy_logp)).sum(dim=-1)
    return (kl * mask).sum() / (count if count is not None else mask.sum().clamp(min=1))


def token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row over the vocabulary: Σ_v p_v (log p_v − log q_v)."""
    return (logps.exp() * (logps - ref_logps)).sum(-1)
