"""SCQ's secondary rule (paper §4.1), which layers get int8 activations: the one place every caller asks —
`mgtq calibrate`'s secondary stage (magnitudes or sensitivities after QAT), `mgtq.quantize_` with an SCQConfig
(magnitudes on calibration prompts) and `mgtq bench`'s random-weight stand-in (a random draw of the same size)."""

from __future__ import annotations

import random

# The paper's split: the lowest-magnitude third of the Linears runs W4A8, the rest W4A16.
A8_FRACTION = 1 / 3


def select_a8_layers(scores: dict[str, float], fraction: float, selection: str, seed: int = 0) -> list[str]:
    """The layers that get int8 activations, sorted: the round(fraction·L) of lowest score (ties by name).

    scores are magnitudes ("lowest", SCQ's rule) or measured sensitivities ("sensitivity"); "random"
    draws as many at random with `seed` (the paper's ablation; scores unused); "all" takes every layer.
    """
    names = sorted(scores)
    if selection == "all":
        return names
    k = round(fraction * len(names))
    if selection == "random":
        return sorted(random.Random(seed).sample(names, k))
    if selection in ("lowest", "sensitivity"):
        return sorted(sorted(names, key=lambda n: (scores[n], n))[:k])
    raise ValueError(f"unknown selection {selection!r}")
