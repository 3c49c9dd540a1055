"""Noise regularization (arXiv 2411.10781 §3.2): ℓ ← ℓ + I(t)·ε, ε ~ N(0, I), after CFG, before softmax.

t = i / (T − 1) is the sampling progress of step i (0 at the first step, 1 at the last). Curves:

- "abs_cos":       I(t) = α·|cos πt|         (the paper's best; the official demo uses α = 2)
- "half_abs_cos":  I(t) = α·½|cos πt|
- "constant":      I(t) = α
- "abs_cos_half_early": I(t) = α·½|cos πt| for t < ½, then α·|cos πt|   (Fig. 8, first piecewise curve)
- "abs_cos_half_late":  I(t) = α·|cos πt| for t < ½, then α·½|cos πt|   (Fig. 8, the reverse)
- "piecewise":     α × linear interpolation through user `knots` ((t, value), …)

The two Fig. 8 curves are as its caption defines them: |cos πt| halved on one side of t = ½.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from mgtq.sampling.tokens import standard_normal

NoiseCurve = Literal["off", "abs_cos", "half_abs_cos", "constant", "abs_cos_half_early", "abs_cos_half_late",
                     "piecewise"]
NOISE_CURVES = get_args(NoiseCurve)


def step_progress(step: int, num_steps: int) -> float:
    """t = i / (T − 1) ∈ [0, 1] (0 when T = 1)."""
    return step / (num_steps - 1) if num_steps > 1 else 0.0


def piecewise_linear(t: float, knots: tuple[tuple[float, float], ...]) -> float:
    """Linear interpolation through knots sorted by t; at a repeated t the later knot wins; clamped."""
    if t <= knots[0][0]:
        return float(knots[0][1])
    value = float(knots[-1][1])
    for (t0, v0), (t1, v1) in zip(knots, knots[1:]):
        if t0 <= t <= t1 and t1 > t0:
            value = v0 + (v1 - v0) * (t - t0) / (t1 - t0)
            if t < t1:
                break  # at t == t1 a later segment (after a jump) may still claim t
    return float(value)


def noise_intensity(curve: str, t: float, scale: float, knots: tuple[tuple[float, float], ...] = ()) -> float:
    """I(t) of a named curve at progress t ∈ [0, 1] with strength α = scale."""
    if curve == "off":
        return 0.0
    if curve == "abs_cos":
        return scale * abs(math.cos(math.pi * t))
    if curve == "half_abs_cos":
        return scale * 0.5 * abs(math.cos(math.pi * t))
    if curve == "constant":
        return float(scale)
    if curve in ("abs_cos_half_early", "abs_cos_half_late"):
        halved = (t < 0.5) == (curve == "abs_cos_half_early")
        return scale * (0.5 if halved else 1.0) * abs(math.cos(math.pi * t))
    if curve == "piecewise":
        return scale * piecewise_linear(t, knots)
    raise ValueError(f"unknown noise curve {curve!r}; choose one of {NOISE_CURVES}")


def regularize_logits(logits: torch.Tensor, intensity: float, generators: list[torch.Generator]) -> torch.Tensor:
    """ℓ + I(t)·ε for logits (B, N, V); ε ~ N(0, I) from each sample's own generator.

    ε is drawn even when I(t) is 0 so the random stream depends on the config, not on t.
    """
    eps = standard_normal(tuple(logits.shape[1:]), generators, logits.device)
    return logits.float() + intensity * eps
