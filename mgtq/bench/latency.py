"""Wall-clock and CPU timing of repeated calls: median with min/max, per-round ratios, per-call hooks.

Pure helpers; the device synchronization is passed in (a no-op on CPU, `torch.cuda.synchronize`
on CUDA) so that a timed call includes the work it queued.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    """Wall seconds of repeated calls: median, min, max and every sample, in call order.

    cpu_*: the process's CPU seconds (all threads) of the same calls. On a machine shared with
    other jobs, wall time grows with their load while CPU time mostly does not (except for
    OpenMP threads spin-waiting on a preempted sibling), so CPU-time ratios tell what a quiet
    machine would show; wall time is what a user waits.
    """

    median: float
    min: float
    max: float
    samples: tuple[float, ...]
    cpu_median: float | None = None
    cpu_samples: tuple[float, ...] | None = None
    rounds: tuple[int, ...] | None = None

    @classmethod
    def of(cls, samples: list[float] | tuple[float, ...], cpu_samples: list[float] | None = None,
           rounds: list[int] | None = None) -> "Timing":
        """`rounds`: the interleaved round each sample was taken in (see mgtq.bench.runner), if any."""
        if not samples:
            raise ValueError("a Timing needs at least one sample")
        if rounds is not None and len(rounds) != len(samples):
            raise ValueError(f"{len(rounds)} round indices for {len(samples)} samples")
        cpu = tuple(cpu_samples) if cpu_samples else None
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples),
                   statistics.median(cpu) if cpu else None, cpu, None if rounds is None else tuple(rounds))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["samples"] = list(self.samples)
        d["cpu_samples"] = None if self.cpu_samples is None else list(self.cpu_samples)
        d["rounds"] = None if self.rounds is None else list(self.rounds)
        return d


def round_ratios(a: dict, b: dict, key: str = "samples") -> list[float]:
    """Per-round ratios a / b of two timings' `key` samples taken in the same interleaved rounds.

    `a` and `b` are Timing dicts; only rounds both have a sample for count. Empty when either timing
    was not interleaved.
    """
    if not a.get("rounds") or not b.get("rounds") or not a.get(key) or not b.get(key):
        return []
    ours, theirs = dict(zip(a["rounds"], a[key])), dict(zip(b["rounds"], b[key]))
    return [ours[r] / theirs[r] for r in sorted(ours.keys() & theirs.keys()) if theirs[r] > 0]


def _no_sync() -> None:
    return None


def time_call(fn: Callable[[], object], sync: Callable[[], None] = _no_sync) -> tuple[float, object]:
    """(seconds, result) of one call, synchronized before and after."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def time_repeated(fn: Callable[[], object], repeats: int, budget_s: float | None = None,
                  sync: Callable[[], None] = _no_sync) -> Timing:
    """Up to `repeats` timed calls of `fn`; with `budget_s`, none more once they took that many seconds
    (at least one always runs, so slow configurations still fit a time limit)."""
    samples: list[float] = []
    cpu_samples: list[float] = []
    for _ in range(repeats):
        cpu_start = time.process_time()
        seconds, _ = time_call(fn, sync)
        cpu_samples.append(time.process_time() - cpu_start)
        samples.append(seconds)
        if budget_s is not None and sum(samples) >= budget_s:
            break
    return Timing.of(samples, cpu_samples)


class CallTimer:
    """Forward hooks timing every call of a module (e.g. the transformer inside the sampler loop).

    Use as a context manager; `durations` holds wall seconds per call, `cpu_durations` the
    process CPU seconds. Hooks are removed on exit.
    """

    def __init__(self, module, sync: Callable[[], None] = _no_sync):
        self.module, self.sync = module, sync
        self.durations: list[float] = []
        self.cpu_durations: list[float] = []
        self._start: tuple[float, float] | None = None
        self._handles = []

    def __enter__(self) -> "CallTimer":
        def pre(_module, _args):
            self.sync()
            self._start = (time.perf_counter(), time.process_time())

        def post(_module, _args, _output):
            self.sync()
            self.durations.append(time.perf_counter() - self._start[0])
            self.cpu_durations.append(time.process_time() - self._start[1])

        self._handles = [self.module.register_forward_pre_hook(pre), self.module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
