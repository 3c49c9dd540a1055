"""SamplerConfig: every knob of the MGT sampler, validated when built.

It maps one-to-one onto YAML/JSON: the tricks of the enhanced sampler are small nested sections,

    num_steps: 48
    guidance_scale: 9.0
    schedule: root          # cosine | linear | pow | root
    rho: 0.6
    noise: {curve: abs_cos, scale: 1.0}
    differential: {percent: 75}
    zsampling: {variant: masked, inversion_cfg: 0.0, steps: null}
    momentum: {order: 0}

and an unknown or misspelled key, at any level, is an error that names it. Every trick's default
is neutral: the default SamplerConfig is the official vanilla sampler, token for token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mgtq.sampling.schedules import SCHEDULES, TIMESTEP_CONVENTIONS
from mgtq.sampling.tricks.momentum import MOMENTUM_ORDERS
from mgtq.sampling.tricks.noise import NOISE_CURVES
from mgtq.sampling.tricks.zsampling import ZSAMPLING_VARIANTS


def _check_keys(cls, data: Mapping, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        names = [f"{where}{k}" for k in unknown]
        raise ValueError(f"unknown sampler setting(s) {names}; known settings{' of ' + where[:-1] if where else ''} "
                         f"are {sorted(known)}")


def _number(value, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return float(value)


def _section(cls, value, name: str):
    """A nested section given as a dataclass or a mapping (from YAML/JSON)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        _check_keys(cls, value, f"{name}.")
        return cls(**value)
    raise ValueError(f"sampler setting {name!r} must be a mapping of {[f.name for f in fields(cls)]}, got {value!r}")


@dataclass(frozen=True)
class NoiseConfig:
    """Noise regularization ℓ ← ℓ + I(t)·ε (mgtq.sampling.tricks.noise).

    curve: one of NOISE_CURVES ("off" = neutral); scale: α; knots: ((t, value), …) for "piecewise".
    """

    curve: str = "off"
    scale: float = 1.0
    knots: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        if self.curve not in NOISE_CURVES:
            raise ValueError(f"unknown noise curve {self.curve!r}; choose one of {NOISE_CURVES}")
        object.__setattr__(self, "scale", _number(self.scale, "noise.scale", 0.0))
        try:
            knots = tuple((float(t), float(v)) for t, v in self.knots)
        except (TypeError, ValueError):
            raise ValueError(f"noise.knots must be (t, value) pairs, got {self.knots!r}") from None
        if self.curve == "piecewise" and len(knots) < 2:
            raise ValueError("noise curve 'piecewise' needs at least two knots (t, value) in noise.knots")
        ts = [t for t, _ in knots]
        if ts != sorted(ts) or any(not 0 <= t <= 1 for t in ts) or any(v < 0 for _, v in knots):
            raise ValueError(f"noise.knots need t in [0, 1], non-decreasing, and values ≥ 0; got {self.knots!r}")
        object.__setattr__(self, "knots", knots)

    @property
    def enabled(self) -> bool:
        return self.curve != "off" and self.scale > 0


@dataclass(frozen=True)
class DifferentialConfig:
    """Differential sampling (mgtq.sampling.tricks.differential): percent = z, 0 = neutral."""

    percent: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "percent", _number(self.percent, "differential.percent", 0.0, 100.0))

    @property
    def enabled(self) -> bool:
        return self.percent > 0


@dataclass(frozen=True)
class ZSamplingConfig:
    """Masked Z-sampling (mgtq.sampling.tricks.zsampling).

    variant: "off" (neutral) | "masked" | "random" | "recover"; inversion_cfg: literal CFG scale of
    the inversion pass, ℓu + s(ℓc − ℓu) (0 = unconditional); steps: the 0-based steps that get a
    Z-step, None = every step but the last.
    """

    variant: str = "off"
    inversion_cfg: float = 0.0
    steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.variant not in ZSAMPLING_VARIANTS:
            raise ValueError(f"unknown Z-sampling variant {self.variant!r}; choose one of {ZSAMPLING_VARIANTS}")
        object.__setattr__(self, "inversion_cfg", _number(self.inversion_cfg, "zsampling.inversion_cfg", 0.0))
        if self.steps is not None:
            steps = tuple(self.steps)
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
                raise ValueError(f"zsampling.steps must be non-negative step indices (or null), got {self.steps!r}")
            object.__setattr__(self, "steps", tuple(sorted(set(steps))))

    @property
    def enabled(self) -> bool:
        return self.variant != "off" and self.steps != ()


@dataclass(frozen=True)
class MomentumConfig:
    """Momentum-based solver (mgtq.sampling.tricks.momentum): order 0 = off, 1 (≡ vanilla), 2."""

    order: int = 0

    def __post_init__(self):
        if isinstance(self.order, bool) or self.order not in MOMENTUM_ORDERS:
            raise ValueError(f"momentum.order must be one of {MOMENTUM_ORDERS}, got {self.order!r}")


_SECTIONS = {"noise": NoiseConfig, "differential": DifferentialConfig, "zsampling": ZSamplingConfig,
             "momentum": MomentumConfig}


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of the MaskGIT-style sampler (defaults = official Meissonic vanilla sampling).

    num_steps: T; guidance_scale: CFG scale s on logits, ℓ = ℓu + s(ℓc − ℓu) (≤ 1 disables CFG);
    schedule/rho: mask schedule σ(t); gumbel_temperature: τ goes linearly from the first value at
    step 0 to the second at step T−1 (confidence = log p + τ·Gumbel); timestep_convention: see
    mgtq.sampling.schedules.timestep_value. noise / differential / zsampling / momentum: the
    enhanced sampler's tricks (arXiv 2411.10781 §3), each neutral by default.
    Presets: `SamplerConfig.preset("vanilla" | "enhanced", **overrides)` (mgtq.sampling.presets).
    """

    num_steps: int = 48
    guidance_scale: float = 9.0
    schedule: str = "cosine"
    rho: float = 1.0
    gumbel_temperature: tuple[float, float] = (2.0, 0.0)
    timestep_convention: str = "step_index"
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    differential: DifferentialConfig = field(default_factory=DifferentialConfig)
    zsampling: ZSamplingConfig = field(default_factory=ZSamplingConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
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
        for name, cls in _SECTIONS.items():
            object.__setattr__(self, name, _section(cls, getattr(self, name), name))
        late = [s for s in (self.zsampling.steps or ()) if s >= self.num_steps]
        if late:
            raise ValueError(f"zsampling.steps {late} are beyond the last step {self.num_steps - 1} of num_steps "
                             f"{self.num_steps}; use steps < num_steps or null (every step but the last)")

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def needs_unconditional(self) -> bool:
        """Whether some model pass needs the unconditional (negative-prompt) branch."""
        z = self.zsampling
        return self.use_cfg or (z.variant == "masked" and z.enabled and z.inversion_cfg != 1.0)

    @property
    def keeps_previous_probs(self) -> bool:
        """Whether a trick reads the previous step's probabilities (differential, 2nd-order solver)."""
        return self.differential.enabled or self.momentum.order == 2

    def replace(self, **changes) -> "SamplerConfig":
        return type(self)(**{**asdict(self), **changes})

    def with_overrides(self, overrides: Mapping[str, Any]) -> "SamplerConfig":
        """A copy with dotted-path overrides, e.g. {"noise.scale": 2.0, "differential.percent": 50}.

        Made for sweeps: every field, nested or not, is reachable by its YAML path.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"unknown sampler setting {key!r}: {part!r} is not a section "
                                     f"(sections: {sorted(_SECTIONS)})")
                node = node[part]
            if leaf not in node:
                raise ValueError(f"unknown sampler setting {key!r}; known here: {sorted(node)}")
            node[leaf] = value
        return type(self).from_dict(data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "SamplerConfig":
        _check_keys(cls, data, "")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, base: "SamplerConfig | None" = None, **overrides) -> "SamplerConfig":
        """A named preset ("vanilla", "enhanced") on top of `base` (default: SamplerConfig()).

        The preset sets the trick fields; `base` keeps the model's steps, CFG and timestep convention;
        keyword overrides (e.g. num_steps=…, guidance_scale=…) win over both.
        """
        from mgtq.sampling.presets import apply_preset

        return apply_preset(name, base or cls()).replace(**overrides)
