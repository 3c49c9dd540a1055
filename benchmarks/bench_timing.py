"""Interleaved timing for the kernel benchmarks (bench_attention, bench_float_linear, bench_linear_kernels).

On a shared, noisy machine the same call reads ±12 % from one sample to the next, and drift over a run
lands on whichever variant runs at that moment. So every variant is called once per round, in turn, and
the spread is reported with the median: a ratio between two variants is the median of the per-round
ratios, each taken from calls seconds apart.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 0,
                       rotate: bool = True) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, one sample per round, after `warmup` untimed calls each.

    rotate: start each round at the next variant (each one first in turn), so none always runs right after
    the same neighbour; False keeps the order of `fns` in every round.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(1000 * (time.perf_counter() - t0))
    return samples


def spread(samples: dict[str, list[float]], base: str | None = None) -> dict[str, dict[str, float]]:
    """Median, min and max ms per variant ("ms", "ms_min", "ms_max"), and with `base` the median, min and max of
    each variant's per-round ratio to it ("ratio", "ratio_min", "ratio_max")."""
    out = {"ms": {n: statistics.median(s) for n, s in samples.items()},
           "ms_min": {n: min(s) for n, s in samples.items()},
           "ms_max": {n: max(s) for n, s in samples.items()}}
    if base is not None:
        ratios = {n: [a / b for a, b in zip(s, samples[base])] for n, s in samples.items()}
        out |= {"ratio": {n: statistics.median(r) for n, r in ratios.items()},
                "ratio_min": {n: min(r) for n, r in ratios.items()},
                "ratio_max": {n: max(r) for n, r in ratios.items()}}
    return out
