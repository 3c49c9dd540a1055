"""SamplerConfig: every knob of the MGT sampler, validated when built.

It maps one-to-one onto YAML/JSON: the tricks of the enhanced sampler are small nested sections,

    num_steps: 48
    guidance_scale: 9.0
    schedule: cosine        # cosine | linear | pow | root
    rho: 1.0
    noise: {curve: abs_cos, scale: 1.0}
    differential: {percent: 75, resample: abs}
    zsampling: {variant: masked, inversion_cfg: 0.0, steps: null, remask: paper}
    momentum: {order: 0}
    reuse: {interval: 1, group: confidence, warmup: 0, bucket: 16, refresh: 0.0}

Reading goes through mgtq.config's strict loader: an unknown or misspelled key, at any level, is an
error that names it, and so is a value of the wrong type or a non-finite number
("guidance_scale must be a finite number, got nan"). Building a dataclass directly runs the same
checks. Every trick's default is neutral: the default SamplerConfig is the official vanilla
sampler, token for token.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mgtq.config import from_mapping, validate
from mgtq.limits import MAX_GUIDANCE, MAX_NOISE_SCALE, MAX_STEPS
from mgtq.reuse.config import ReuseConfig
from mgtq.sampling.presets import PRESET_NAMES, preset_fields
from mgtq.sampling.schedules import Schedule, TimestepConvention
from mgtq.sampling.tricks.differential import Resample
from mgtq.sampling.tricks.momentum import MOMENTUM_ORDERS
from mgtq.sampling.tricks.noise import NoiseCurve
from mgtq.sampling.tricks.zsampling import Remask, ZSamplingVariant

__all__ = ["SamplerConfig", "NoiseConfig", "DifferentialConfig", "ZSamplingConfig", "MomentumConfig", "PRESET_NAMES"]


@dataclass(frozen=True)
class NoiseConfig:
    """Noise regularization ℓ ← ℓ + I(t)·ε (mgtq.sampling.tricks.noise).

    curve: one of NOISE_CURVES ("off" = neutral); scale: α ≥ 0; knots: ((t, value), …) for "piecewise".
    """

    curve: NoiseCurve = "off"
    scale: float = 1.0
    knots: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        validate(self, "noise")
        if not 0 <= self.scale <= MAX_NOISE_SCALE:
            raise ValueError(f"noise.scale must be in [0, {MAX_NOISE_SCALE:g}] (mgtq.limits), got {self.scale}")
        if self.curve == "piecewise" and len(self.knots) < 2:
            raise ValueError("noise curve 'piecewise' needs at least two knots (t, value) in noise.knots")
        ts = [t for t, _ in self.knots]
        if ts != sorted(ts) or any(not 0 <= t <= 1 for t in ts) or any(v < 0 for _, v in self.knots):
            raise ValueError(f"noise.knots need t in [0, 1], non-decreasing, and values ≥ 0; got {self.knots!r}")

    @property
    def enabled(self) -> bool:
        return self.curve != "off" and self.scale > 0


@dataclass(frozen=True)
class DifferentialConfig:
    """Differential sampling (mgtq.sampling.tricks.differential): percent = z in [0, 100], 0 = neutral;
    resample: "abs" |p_i − p_{i−1}| (paper) or "clipped" clip(p_i − p_{i−1}, 1e−6) (official demo)."""

    percent: float = 0.0
    resample: Resample = "abs"

    def __post_init__(self):
        validate(self, "differential")
        if not 0 <= self.percent <= 100:
            raise ValueError(f"differential.percent must be in [0, 100], got {self.percent}")

    @property
    def enabled(self) -> bool:
        return self.percent > 0


@dataclass(frozen=True)
class ZSamplingConfig:
    """Masked Z-sampling (mgtq.sampling.tricks.zsampling).

    variant: "off" (neutral) | "masked" | "random" | "recover"; inversion_cfg: literal CFG scale of
    the inversion pass, ℓu + s(ℓc − ℓu), any finite value (0 = unconditional, 1 = conditional,
    negative = away from the prompt); steps: the 0-based steps that get a Z-step, None = every step
    but the last; remask: the masked variant's re-mask rule, "paper" (lowest log p of the decoded
    token) or "official" (the demo's: highest max-probability).
    """

    variant: ZSamplingVariant = "off"
    inversion_cfg: float = 0.0
    steps: tuple[int, ...] | None = None
    remask: Remask = "paper"

    def __post_init__(self):
        validate(self, "zsampling")
        if abs(self.inversion_cfg) > MAX_GUIDANCE:
            raise ValueError(f"zsampling.inversion_cfg must be in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}] (mgtq.limits), "
                             f"got {self.inversion_cfg}")
        if self.steps is not None:
            if any(s < 0 for s in self.steps):
                raise ValueError(f"zsampling.steps must be non-negative step indices (or null), got {self.steps!r}")
            object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))
        if self.remask != "paper" and self.variant in ("random", "recover"):
            raise ValueError(f"zsampling.remask {self.remask!r} ranks by the inversion pass, which only the "
                             f"'masked' variant runs; use remask 'paper' with variant {self.variant!r}")

    @property
    def enabled(self) -> bool:
        return self.variant != "off" and self.steps != ()


@dataclass(frozen=True)
class MomentumConfig:
    """Momentum-based solver (mgtq.sampling.tricks.momentum): order 0 = off, 1 (≡ vanilla), 2."""

    order: int = 0

    def __post_init__(self):
        validate(self, "momentum")
        if self.order not in MOMENTUM_ORDERS:
            raise ValueError(f"momentum.order must be one of {MOMENTUM_ORDERS}, got {self.order!r}")


class _class_or_instance:
    """A method descriptor: on the class it is a classmethod; on an instance, that instance is passed as `base`.

    A plain classmethod called on an instance silently drops it (`config.preset("fast")` would start from
    the 48-step defaults, not from `config`); this makes the instance call mean what it reads as.
    """

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, instance, owner):
        if instance is None:
            return functools.partial(self.func, owner)

        @functools.wraps(self.func)
        def on_instance(name, **overrides):
            if "base" in overrides:
                raise TypeError("config.preset(name) already takes `config` as its base; pass base= only on the "
                                "class: SamplerConfig.preset(name, base=...)")
            return self.func(owner, name, base=instance, **overrides)

        return on_instance


_SECTIONS = {"noise": NoiseConfig, "differential": DifferentialConfig, "zsampling": ZSamplingConfig,
             "momentum": MomentumConfig, "reuse": ReuseConfig}


def flatten_overrides(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"noise": {"scale": 2}} → {"noise.scale": 2} (`SamplerConfig.with_overrides`' keys); lists and scalars are
    leaves, dotted keys stay as they are."""
    flat = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_overrides(value, f"{path}."))
        else:
            flat[path] = value
    return flat


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of the MaskGIT-style sampler (defaults = official Meissonic vanilla sampling).

    num_steps: T; guidance_scale: CFG scale s on logits, ℓ = ℓu + s(ℓc − ℓu) (≤ 1 disables CFG);
    schedule/rho: mask schedule σ(t); inpaint_schedule: the one inpainting and outpainting run instead (linear, as
    the official Meissonic and diffusers' aMUSEd inpainting do; None: `schedule`); gumbel_temperature: τ goes
    linearly from the first value at step 0 to the second at step T−1 (confidence = log p + τ·Gumbel);
    timestep_convention: what the transformer's `timestep` input means (mgtq.sampling.schedules.timestep_value),
    a property of the model: None (the default) is the model's, which a pipeline fills in from its checkpoint
    (`convention` reads None as "step_index", the official pipeline's, where no checkpoint says). noise / differential / zsampling / momentum: the
    enhanced sampler's tricks (arXiv 2411.10781 §3), each neutral by default.
    Presets: `SamplerConfig.preset(name, base=None, **overrides)`, or `config.preset(name, **overrides)` on
    top of `config`; name one of PRESET_NAMES (mgtq.sampling.presets).
    """

    num_steps: int = 48
    guidance_scale: float = 9.0
    schedule: Schedule = "cosine"
    rho: float = 1.0
    inpaint_schedule: Schedule | None = "linear"
    gumbel_temperature: tuple[float, float] = (2.0, 0.0)
    timestep_convention: TimestepConvention | None = None
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    differential: DifferentialConfig = field(default_factory=DifferentialConfig)
    zsampling: ZSamplingConfig = field(default_factory=ZSamplingConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)  # context reuse (mgtq.reuse); off by default

    def __post_init__(self):
        validate(self)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps}")
        if self.num_steps > MAX_STEPS:
            raise ValueError(f"num_steps must be an integer in [1, {MAX_STEPS}] (mgtq.limits), got {self.num_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be ≥ 0, got {self.guidance_scale}")
        if self.guidance_scale > MAX_GUIDANCE:
            raise ValueError(f"guidance_scale must be in [0, {MAX_GUIDANCE:g}] (mgtq.limits), "
                             f"got {self.guidance_scale}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if min(self.gumbel_temperature) < 0:
            raise ValueError(f"gumbel_temperature must be two non-negative numbers, got {self.gumbel_temperature!r}")
        late = [s for s in (self.zsampling.steps or ()) if s >= self.num_steps]
        if late:
            raise ValueError(f"zsampling.steps {late} are beyond the last step {self.num_steps - 1} of num_steps "
                             f"{self.num_steps}; use steps < num_steps or null (every step but the last)")

    @property
    def convention(self) -> TimestepConvention:
        """The timestep convention the sampler feeds: `timestep_convention`, or the official "step_index"."""
        return self.timestep_convention or "step_index"

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

    def for_inpainting(self) -> "SamplerConfig":
        """These settings as inpainting runs them: on `inpaint_schedule` (when set)."""
        if self.inpaint_schedule is None or self.inpaint_schedule == self.schedule:
            return self
        return self.replace(schedule=self.inpaint_schedule)

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
        """Strictly typed load of a mapping (YAML/JSON): unknown keys and bad values are named."""
        return from_mapping(cls, data)

    @_class_or_instance
    def preset(cls, name: str, base: "SamplerConfig | None" = None, **overrides) -> "SamplerConfig":
        """A named preset (one of PRESET_NAMES) on top of `base` (default: SamplerConfig()).

        The preset sets the trick fields; `base` keeps the model's steps, CFG and timestep convention;
        keyword overrides (e.g. num_steps=…, guidance_scale=…) win over both. On an instance,
        `config.preset(name, **overrides)` takes that instance as the base (a checkpoint's steps and
        CFG survive `pipe.settings.sampler.preset("fast")`).
        """
        return (base or cls()).replace(**preset_fields(name)).replace(**overrides)
