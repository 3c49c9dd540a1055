"""SamplerConfig: every knob of the MGT sampler, validated when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mgtq.sampling.schedules import SCHEDULES, TIMESTEP_CONVENTIONS


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of the MaskGIT-style sampler (defaults = official Meissonic vanilla sampling).

    num_steps: T; guidance_scale: CFG scale s on logits, ℓ = ℓu + s(ℓc − ℓu) (≤ 1 disables CFG);
    schedule/rho: mask schedule σ(t); gumbel_temperature: τ goes linearly from the first value at
    step 0 to the second at step T−1 (confidence = log p + τ·Gumbel); timestep_convention: see
    mgtq.sampling.schedules.timestep_value.
    """

    num_steps: int = 48
    guidance_scale: float = 9.0
    schedule: str = "cosine"
    rho: float = 1.0
    gumbel_temperature: tuple[float, float] = (2.0, 0.0)
    timestep_convention: str = "step_index"

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be ≥ 0, got {self.guidance_scale}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        temps = tuple(float(t) for t in self.gumbel_temperature)
        if len(temps) != 2 or min(temps) < 0:
            raise ValueError(f"gumbel_temperature must be two non-negative numbers, got {self.gumbel_temperature!r}")
        object.__setattr__(self, "gumbel_temperature", temps)
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"unknown timestep_convention {self.timestep_convention!r}; choose one of {TIMESTEP_CONVENTIONS}")

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def replace(self, **changes) -> "SamplerConfig":
        return type(self)(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {unknown}; known settings are {sorted(known)}")
        return cls(**data)
