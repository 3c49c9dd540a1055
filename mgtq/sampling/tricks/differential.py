"""Differential sampling (arXiv 2411.10781 §3.3): d_j = KL(p_i^j ‖ p_{i−1}^j); the z% tokens of
lowest d_j are sampled from |p_i^j − p_{i−1}^j| normalized instead of from p_i^j.

Interpretation (paper text + official demo): the ranking runs over all N token positions of a
sample (decoded positions included, as in the demo — they keep their token anyway), k = ⌊z·N/100⌋;
the resampled distribution also feeds the confidence ranking, as any adjusted p does. Where
|p_i − p_{i−1}| is all zero (identical rows) the row keeps p_i. p_{i−1} is the previous committed
step's prediction within ONE sampling call (the demo keeps it on the scheduler object, where it
leaks across images).

resample = "abs" (default) follows the paper, |p_i − p_{i−1}|; "clipped" is the official demo's
clip(p_i − p_{i−1}, 10⁻⁶), which keeps only the tokens whose probability rose (an identical
row becomes uniform there).

In editing, the ranking runs over the editable positions only, k = ⌊z·N_editable/100⌋: fixed
(context) tokens are never sampled, so they would only take places of the z% without effect.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from mgtq.sampling.tokens import remask_lowest

Resample = Literal["abs", "clipped"]
RESAMPLE_RULES = get_args(Resample)
CLIP_FLOOR = 1e-6  # the official demo's floor of the signed difference


def token_kl(probs: torch.Tensor, prev_probs: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per token: probs, prev_probs (B, N, V) → (B, N); 0·log 0 = 0, q clamped away from 0."""
    p, q = probs.float(), prev_probs.float()
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q.clamp_min(1e-20))).sum(-1)


def num_resampled(percent: float, num_tokens: int) -> int:
    """k = ⌊z·N/100⌋ (a hair of slack so 75 % of 16 is exactly 12)."""
    return min(num_tokens, int(math.floor(percent * num_tokens / 100 + 1e-9)))


def differential_selection(probs: torch.Tensor, prev_probs: torch.Tensor, percent: float,
                           editable: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, N): the ⌊z·N/100⌋ positions of lowest KL(p_i ‖ p_{i−1}) in each sample (ties by index).

    editable (B, N) bool: rank only these positions, N = their count per sample (None: all).
    """
    kl = token_kl(probs, prev_probs)
    if editable is None:
        k = torch.full((kl.shape[0],), num_resampled(percent, kl.shape[1]), device=kl.device)
        return remask_lowest(kl, k)
    k = torch.tensor([num_resampled(percent, int(n)) for n in editable.sum(-1)], device=kl.device)
    return remask_lowest(torch.where(editable, kl, torch.full_like(kl, float("inf"))), k) & editable


def resample_weights(probs: torch.Tensor, prev_probs: torch.Tensor, rule: str = "abs") -> torch.Tensor:
    """Unnormalized weights (B, N, V) of the difference: |p_i − p_{i−1}| ("abs") or
    clip(p_i − p_{i−1}, 10⁻⁶) ("clipped")."""
    diff = probs.float() - prev_probs.float()
    if rule == "abs":
        return diff.abs()
    if rule == "clipped":
        return diff.clamp_min(CLIP_FLOOR)
    raise ValueError(f"unknown differential resample rule {rule!r}; choose one of {RESAMPLE_RULES}")


def differential_probs(probs: torch.Tensor, prev_probs: torch.Tensor, percent: float,
                       rule: str = "abs", editable: torch.Tensor | None = None) -> torch.Tensor:
    """probs (B, N, V) with the z% lowest-KL rows (of the editable positions, if given) replaced by the
    normalized difference weights."""
    if percent <= 0:
        return probs
    chosen = differential_selection(probs, prev_probs, percent, editable)
    residual = resample_weights(probs, prev_probs, rule)
    total = residual.sum(-1, keepdim=True)
    usable = chosen[..., None] & (total > 0)  # a zero row has nothing to sample from: keep p_i
    return torch.where(usable, residual / total.clamp_min(1e-30), probs.float())
