"""Differential sampling (arXiv 2411.10781 §3.3): d_j = KL(p_i^j ‖ p_{i−1}^j); the z% tokens of
lowest d_j are sampled from |p_i^j − p_{i−1}^j| normalized instead of from p_i^j.

Interpretation (paper text + official demo): the ranking runs over all N token positions of a
sample (decoded positions included, as in the demo — they keep their token anyway), k = ⌊z·N/100⌋;
the resampled distribution also feeds the confidence ranking, as any adjusted p does. Where
|p_i − p_{i−1}| is all zero (identical rows) the row keeps p_i. The demo uses the clipped signed
difference max(p_i − p_{i−1}, 10⁻⁶); mgtq follows the paper's absolute value. p_{i−1} is the
previous committed step's prediction within ONE sampling call (the demo keeps it on the scheduler
object, where it leaks across images).
"""

from __future__ import annotations

import math

import torch

from mgtq.sampling.tokens import remask_lowest


def token_kl(probs: torch.Tensor, prev_probs: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per token: probs, prev_probs (B, N, V) → (B, N); 0·log 0 = 0, q clamped away from 0."""
    p, q = probs.float(), prev_probs.float()
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q.clamp_min(1e-20))).sum(-1)


def num_resampled(percent: float, num_tokens: int) -> int:
    """k = ⌊z·N/100⌋ (a hair of slack so 75 % of 16 is exactly 12)."""
    return min(num_tokens, int(math.floor(percent * num_tokens / 100 + 1e-9)))


def differential_selection(probs: torch.Tensor, prev_probs: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean (B, N): the ⌊z·N/100⌋ positions of lowest KL(p_i ‖ p_{i−1}) in each sample (ties by index)."""
    kl = token_kl(probs, prev_probs)
    k = torch.full((kl.shape[0],), num_resampled(percent, kl.shape[1]), device=kl.device)
    return remask_lowest(kl, k)


def differential_probs(probs: torch.Tensor, prev_probs: torch.Tensor, percent: float) -> torch.Tensor:
    """probs (B, N, V) with the z% lowest-KL rows replaced by |p_i − p_{i−1}| / Σ|p_i − p_{i−1}|."""
    if percent <= 0:
        return probs
    chosen = differential_selection(probs, prev_probs, percent)
    residual = (probs.float() - prev_probs.float()).abs()
    total = residual.sum(-1, keepdim=True)
    usable = chosen[..., None] & (total > 0)  # a zero row has nothing to sample from: keep p_i
    return torch.where(usable, residual / total.clamp_min(1e-30), probs.float())
