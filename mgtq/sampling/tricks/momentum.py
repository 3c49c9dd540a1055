"""Momentum-based solver (arXiv 2411.10781 Eq. 4 / Eq. 13), written from the paper's equations.

σ is the mask ratio (fraction of tokens still masked), a step goes s → t with σ_t < σ_s, and
x̂_s is the model's prediction at s — for an MGT a categorical distribution per token.

1st order (Eq. 4):  z_t = (σ_t/σ_s)·z_s + (1 − σ_t/σ_s)·x̂_s
    In tokens: of the N·σ_s masked tokens of z_s, N·σ_t stay masked (taken from z_s) and the
    N·(σ_s − σ_t) most confident are taken from the prediction. That IS the MaskGIT step (counts
    from the schedule, confidence = log p + τ·Gumbel), so order 1 reproduces vanilla exactly.
2nd order (Eq. 13, a DPM-Solver++(2M)-style multistep):  x̂_s is replaced by
    D_s = x̂_s + (1/(2r))·(x̂_s − x̂_{s'}),   r = h'/h,  h = λ_t − λ_s,  h' = λ_s − λ_{s'},
    λ(σ) = log((1 − σ)/σ)  (log "signal-to-mask" ratio; s' is the previous step).

Interpretation where the paper is not explicit: the difference term acts on probabilities
(x̂ = p); D can leave the simplex, so it is clamped at 0 and renormalized (a zero row keeps p_s).
σ values are the schedule's σ(i/T); where λ or r is not finite (the first steps, where σ_{s'} = 1,
and the last step, where σ_t = 0 — DPM-Solver's "lower order at the end") the step is first order.
That needs σ(1) to be exactly 0, which mgtq.sampling.schedules.mask_ratio guarantees for every
schedule (the cosine one would otherwise give 6e−17 and a coefficient near 20).
The difference term changes which token is drawn and how confident it is, never how many tokens
are decoded: the token count of every step is the first-order one, i.e. the schedule's.
"""

from __future__ import annotations

import math

import torch

MOMENTUM_ORDERS = (0, 1, 2)  # 0 = off; 1 = the first-order solver (≡ vanilla); 2 = adds the difference term


def log_snr(sigma: float) -> float:
    """λ(σ) = log((1 − σ)/σ); −inf at σ = 1 (all masked), +inf at σ = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def second_order_coefficient(sigma_prev: float, sigma_s: float, sigma_t: float) -> float:
    """c = 1/(2r) = h / (2h') of Eq. 13; 0 (first order) when h, h' are not finite and positive."""
    lam_prev, lam_s, lam_t = log_snr(sigma_prev), log_snr(sigma_s), log_snr(sigma_t)
    h, h_prev = lam_t - lam_s, lam_s - lam_prev
    if not (math.isfinite(h) and math.isfinite(h_prev)) or h <= 0 or h_prev <= 0:
        return 0.0
    return h / (2.0 * h_prev)


def second_order_probs(probs: torch.Tensor, prev_probs: torch.Tensor, coefficient: float) -> torch.Tensor:
    """D = p_s + c·(p_s − p_{s'}) projected back onto the simplex: (B, N, V) → (B, N, V)."""
    if coefficient == 0.0:
        return probs
    p = probs.float()
    d = (p + coefficient * (p - prev_probs.float())).clamp_min(0.0)
    total = d.sum(-1, keepdim=True)
    return torch.where(total > 0, d / total.clamp_min(1e-30), p)
