"""Named sampler presets: the official vanilla sampler and the paper's enhanced combination.

A preset sets only the trick fields (schedule, ρ, noise, differential, zsampling, momentum); the
model-specific fields (num_steps, guidance_scale, gumbel_temperature, timestep_convention) come
from the base config, i.e. from the checkpoint, unless overridden.

- "vanilla": official Meissonic/MaskGIT sampling — cos(πt/2) schedule, no tricks.
- "enhanced": the paper's best combination (arXiv 2411.10781 §3):
    schedule 1 − t^0.6 ("root", ρ = 0.6; Table 2);
    noise regularization I(t) = |cos πt| with α = 1 as the paper states it (the official demo
      scales it by 2: use noise.scale = 2 / --noise-scale 2 to match the demo);
    differential sampling z = 75 % (the demo's 3072 of 4096 tokens);
    masked Z-sampling, inversion CFG 0 (unconditional), at every step but the last (as the demo),
      so NFE = 3T − 2;
    momentum solver off: the paper studies it as a DM-style way to accelerate sampling, not as
      part of the enhanced-inference combination, and mgtq could not check its reported gains
      (sweep momentum.order = 2 to test it).
  The demo differs: 64 steps (mgtq keeps the checkpoint's, 48 for Meissonic), noise ×2, and the
  demo's Z-sampling/differential code paths have the bugs listed in the trick modules.
"""

from __future__ import annotations

from types import MappingProxyType

from mgtq.sampling.config import SamplerConfig

PRESET_NAMES = ("vanilla", "enhanced")

_TRICK_FIELDS = MappingProxyType({
    "vanilla": MappingProxyType({
        "schedule": "cosine", "rho": 1.0,
        "noise": {"curve": "off", "scale": 1.0, "knots": ()},
        "differential": {"percent": 0.0},
        "zsampling": {"variant": "off", "inversion_cfg": 0.0, "steps": None},
        "momentum": {"order": 0},
    }),
    "enhanced": MappingProxyType({
        "schedule": "root", "rho": 0.6,
        "noise": {"curve": "abs_cos", "scale": 1.0, "knots": ()},
        "differential": {"percent": 75.0},
        "zsampling": {"variant": "masked", "inversion_cfg": 0.0, "steps": None},
        "momentum": {"order": 0},
    }),
})


def preset_fields(name: str) -> dict:
    """The trick fields a preset sets, as a fresh dict (YAML-shaped)."""
    if name not in _TRICK_FIELDS:
        raise ValueError(f"unknown sampler preset {name!r}; choose one of {PRESET_NAMES}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in _TRICK_FIELDS[name].items()}


def apply_preset(name: str, base: SamplerConfig) -> SamplerConfig:
    """`base` with the preset's trick fields; its steps, CFG, Gumbel τ and timestep convention stay."""
    return base.replace(**preset_fields(name))
