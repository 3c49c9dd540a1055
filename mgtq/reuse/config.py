"""ReuseConfig: when the sampler runs full steps and which tokens its local steps compute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mgtq.config import validate

GroupRule = Literal["confidence", "cells", "masked"]
GROUP_RULES = get_args(GroupRule)


@dataclass(frozen=True)
class ReuseConfig:
    """Context reuse (mgtq.reuse, ReCAP arXiv 2505.19089): full steps every `interval` steps, local ones between.

    interval: steps from one full step to the next; 1 = every step full, the plain sampler (off).
    group: which tokens the local steps after a full step compute, besides the ones that full step
    decoded (their input changed since the cache was built): "confidence" (ReCAP's grouped decoding:
    the tokens the full step left masked that its confidence, log p + τ·Gumbel, ranks highest, as many
    as the schedule decodes before the next full step; the local steps decode only among them),
    "cells" (the same count, taken in whole 2×2 cells ranked by their most confident token: with
    feature compression a cell is one transformer token, so local steps compute fewer) or "masked"
    (every token left masked: the local steps decode freely, each costs more).
    warmup: the first `warmup` steps of a run are all full steps (the layout of the image forms there).
    bucket: a local step's token count is padded up to a multiple of this, so compiled blocks see a
    few lengths instead of one per step.
    refresh: selective K/V refresh (MARché arXiv 2506.12035): at each local step, also recompute this
    fraction (of the decoded image tokens, at least one when > 0) of the decoded context tokens that the
    previous local step's active tokens attended to most, so their cached keys/values follow the
    tokens decoded since the full step (mgtq.reuse.cache). 0 = off; it costs that many more rows.
    """

    interval: int = 1
    group: GroupRule = "confidence"
    warmup: int = 0
    bucket: int = 16
    refresh: float = 0.0

    def __post_init__(self):
        validate(self, "reuse")
        if self.interval < 1:
            raise ValueError(f"reuse.interval must be an integer ≥ 1 (1 = off), got {self.interval}")
        if self.warmup < 0:
            raise ValueError(f"reuse.warmup must be an integer ≥ 0, got {self.warmup}")
        if self.bucket < 1:
            raise ValueError(f"reuse.bucket must be an integer ≥ 1, got {self.bucket}")
        if not 0 <= self.refresh <= 1:
            raise ValueError(f"reuse.refresh must be a fraction in [0, 1] of the decoded tokens (0 = off), "
                             f"got {self.refresh}")

    @property
    def enabled(self) -> bool:
        return self.interval > 1

    def is_full(self, steps_run: int) -> bool:
        """Whether the run's step number `steps_run` (0 = its first step) is a full step."""
        return steps_run < self.warmup or (steps_run - self.warmup) % self.interval == 0
