"""Wall-clock timing: warm-up, repeats, median with min/max.

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
    """Seconds of repeated calls: median, min, max and every sample, in call order."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float] | tuple[float, ...]) -> "Timing":
        if not samples:
            raise ValueError("a Timing needs at least one sample")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["samples"] = list(self.samples)
        return d


def _no_sync() -> None:
    return None


def time_call(fn: Callable[[], object], sync: Callable[[], None] = _no_sync) -> tuple[float, object]:
    """(seconds, result) of one call, synchronized before and after."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def time_repeated(fn: Callable[[], object], warmup: int, repeats: int, budget_s: float | None = None,
                  sync: Callable[[], None] = _no_sync) -> Timing:
    """Call `fn` `warmup` times untimed, then up to `repeats` timed times.

    With `budget_s`, timing stops early once the timed calls took that many seconds in total
    (at least one timed call always runs), so slow configurations still fit a time limit; the
    number of samples says how many ran.
    """
    for _ in range(warmup):
        fn()
        sync()
    samples: list[float] = []
    for _ in range(repeats):
        seconds, _ = time_call(fn, sync)
        samples.append(seconds)
        if budget_s is not None and sum(samples) >= budget_s:
            break
    return Timing.of(samples)


class CallTimer:
    """Forward hooks timing every call of a module (e.g. the transformer inside the sampler loop).

    Use as a context manager; `durations` holds seconds per call. Hooks are removed on exit.
    """

    def __init__(self, module, sync: Callable[[], None] = _no_sync):
        self.module, self.sync = module, sync
        self.durations: list[float] = []
        self._start: float | None = None
        self._handles = []

    def __enter__(self) -> "CallTimer":
        def pre(_module, _args):
            self.sync()
            self._start = time.perf_counter()

        def post(_module, _args, _output):
            self.sync()
            self.durations.append(time.perf_counter() - self._start)

        self._handles = [self.module.register_forward_pre_hook(pre), self.module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
