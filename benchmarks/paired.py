"""Paired comparison of two settings scored on the same ShapeBench prompts and seeds.

Two settings judged on the same prompts share most of their verdicts, so the noise in their accuracy
difference comes from the prompts on which they disagree only; an interval that treats the two
accuracies as independent is far too wide, and a Wald interval on the difference breaks down near 0/1
and with few discordant prompts. The scripts in this folder import this module as their neighbour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

NO_VERDICTS = "n/a (no per-prompt verdicts)"  # a result file written before the scripts kept `ok` per prompt


def paired_difference(a: Sequence[bool], b: Sequence[bool], confidence: float = 0.95) -> dict:
    """Accuracy of b minus accuracy of a over the same prompts, with a paired confidence interval.

    Interval: Newcombe's hybrid score interval for paired proportions (method 10 of Newcombe, R. G. 1998,
    "Improved confidence intervals for the difference between binomial proportions based on paired data",
    Statistics in Medicine 17:2635-2650). p: the exact (binomial) two-sided McNemar test on the discordant
    prompts. Returns {"n", "diff", "ci": [low, high], "a_only", "b_only", "p"}; a_only / b_only count the
    prompts only a / only b got right.
    """
    if len(a) != len(b):
        raise ValueError(f"paired verdicts must cover the same prompts: {len(a)} against {len(b)}")
    if not a:
        raise ValueError("no prompts to compare")
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    low, high = _newcombe_paired(both, b_only, a_only, n - both - a_only - b_only, confidence)
    return {"n": n, "diff": (b_only - a_only) / n, "ci": [low, high], "a_only": a_only, "b_only": b_only,
            "p": mcnemar_exact(a_only, b_only)}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant prompt is a fair coin."""
    m = a_only + b_only
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2 ** m)


def paired_or_none(a: Sequence[bool] | None, b: Sequence[bool] | None) -> dict | None:
    """`paired_difference(a, b)`, or None where either side lacks per-prompt verdicts (an older result file)."""
    return None if a is None or b is None else paired_difference(a, b)


def paired_cell(result: dict | None) -> str:
    """A table cell: "+0.012 [-0.020, +0.044]", or NO_VERDICTS for None."""
    if result is None:
        return NO_VERDICTS
    low, high = result["ci"]
    return f"{result['diff']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    centre, half = successes + z * z / 2, z * math.sqrt(successes * (n - successes) / n + z * z / 4)
    return (centre - half) / (n + z * z), (centre + half) / (n + z * z)


def _newcombe_paired(e: int, f: int, g: int, h: int, confidence: float) -> tuple[float, float]:
    """Newcombe's method 10 for p1 - p2, p1 = (e + f) / n and p2 = (e + g) / n (his 2×2 notation): each marginal's
    Wilson interval, combined with the pairs' correlation phi (continuity-corrected when positive, as he does)."""
    n = e + f + g + h
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = _wilson(e + f, n, z)
    l2, u2 = _wilson(e + g, n, z)
    margins = (e + f) * (g + h) * (e + g) * (f + h)
    cross = e * h - f * g
    phi = 0.0 if margins == 0 else (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins)
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)
