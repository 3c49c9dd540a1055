"""Named sampler presets, as data: the trick fields each one sets.

A preset sets only the trick fields (schedule, ρ, noise, differential, zsampling, momentum, reuse); the
model-specific fields (num_steps, guidance_scale, gumbel_temperature, timestep_convention) come
from the base config, i.e. from the checkpoint, unless overridden. `SamplerConfig.preset` applies
them; this module imports nothing from the sampler, so the two cannot form an import cycle.

- "vanilla": official Meissonic/MaskGIT sampling — cos(πt/2) schedule, no tricks.
- "paper-combo": the combination of the paper's combination tables (arXiv 2411.10781 Tables 13/14,
    Fig. 11), on the cosine schedule: noise regularization |cos πt| with α = 1, differential
    sampling z = 75 %, masked Z-sampling with inversion CFG 0 at every step but the last
    (NFE = 3T − 2). The official demo differs: 64 steps, noise ×2, and its own re-mask and
    resample rules (zsampling.remask / differential.resample = "official" / "clipped").
- "paper-combo-root": paper-combo on the 1 − t^0.6 schedule (Table 2's best schedule alone), which
    the paper's combination tables do not use: it shows whether the best schedule and the best tricks
    add up (benchmarks/ablations_sampler.py runs both).
- "fast": vanilla with context reuse: the first 6 steps full, then a full step every 4, local steps
    decoding their group in whole 2×2 cells. Chosen on ShapeBench val by one rule: of the settings within
    0.02 of no acceleration, the one with the fewest full steps at 48 steps
    (benchmarks/results/reuse_select_val1280.md). Opt-in, not a default: it does not beat fewer plain
    steps at the same token cost (README "Context reuse").
The momentum solver is in no preset: the paper studies it to accelerate sampling, not as part of
the combination.
"""

from __future__ import annotations

from types import MappingProxyType

_VANILLA = MappingProxyType({
    "schedule": "cosine", "rho": 1.0,
    "noise": {"curve": "off", "scale": 1.0, "knots": ()},
    "differential": {"percent": 0.0, "resample": "abs"},
    "zsampling": {"variant": "off", "inversion_cfg": 0.0, "steps": None, "remask": "paper"},
    "momentum": {"order": 0},
    "reuse": {"interval": 1, "group": "confidence", "warmup": 0, "bucket": 16, "refresh": 0.0},
})
_PAPER_COMBO = MappingProxyType({
    **_VANILLA,
    "noise": {"curve": "abs_cos", "scale": 1.0, "knots": ()},
    "differential": {"percent": 75.0, "resample": "abs"},
    "zsampling": {"variant": "masked", "inversion_cfg": 0.0, "steps": None, "remask": "paper"},
})
_TRICK_FIELDS = MappingProxyType({
    "vanilla": _VANILLA,
    "paper-combo": _PAPER_COMBO,
    "paper-combo-root": MappingProxyType({**_PAPER_COMBO, "schedule": "root", "rho": 0.6}),
    "fast": MappingProxyType({**_VANILLA, "reuse": {"interval": 4, "group": "cells", "warmup": 5, "bucket": 16, "refresh": 0.0}}),
})
PRESET_NAMES = tuple(_TRICK_FIELDS)


def preset_fields(name: str) -> dict:
    """The trick fields a preset sets, as a fresh dict (YAML-shaped)."""
    if name not in _TRICK_FIELDS:
        raise ValueError(f"unknown sampler preset {name!r}; choose one of {PRESET_NAMES}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in _TRICK_FIELDS[name].items()}
