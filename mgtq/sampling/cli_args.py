"""Command-line flags of the enhanced sampler, so `mgtq generate` / `mgtq eval` stay thin:

    add_sampler_arguments(parser)                       # adds the flags below
    config = sampler_config_from_args(args, base)       # base = the checkpoint's SamplerConfig

Precedence: base → --sampler preset → --sampler-config file → the individual flags. A flag left
out changes nothing. A command's --steps / --cfg come in as `fields`, set together with the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mgtq import argtypes
from mgtq.config import read_mapping
from mgtq.limits import MAX_GUIDANCE, MAX_NOISE_SCALE
from mgtq.reuse.config import GROUP_RULES, ReuseConfig
from mgtq.sampling.config import SamplerConfig, flatten_overrides
from mgtq.sampling.presets import PRESET_NAMES
from mgtq.sampling.schedules import SCHEDULES
from mgtq.sampling.tricks.differential import RESAMPLE_RULES
from mgtq.sampling.tricks.momentum import MOMENTUM_ORDERS
from mgtq.sampling.tricks.noise import NOISE_CURVES
from mgtq.sampling.tricks.zsampling import REMASK_RULES, ZSAMPLING_VARIANTS


def parse_steps(spec: str) -> tuple[int, ...] | str:
    """Z-step spec: "all" (every step but the last) stays "all"; "0:10" → 0…9; "0,2,5" → those steps."""
    spec = spec.strip()
    allowed = "takes 'all', 'START:STOP' (0 ≤ START < STOP) or 'I,J,…' (step indices ≥ 0)"
    try:
        if spec == "all":
            return "all"
        if ":" in spec:
            start, stop = (int(x) for x in spec.split(":"))
            steps = tuple(range(start, stop))
        else:
            steps = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{allowed}, got {spec!r}") from None
    if not steps or min(steps) < 0:  # an empty range would silently turn Z-sampling off
        raise argparse.ArgumentTypeError(f"{allowed}, got {spec!r}")
    return steps


def load_sampler_file(path: str | Path) -> dict:
    """A JSON or YAML mapping of SamplerConfig fields (e.g. one point of a benchmark sweep)."""
    return read_mapping(path, f"sampler config file {str(path)!r}")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the sampler flags (all default to None = keep the base config's value)."""
    g = parser.add_argument_group("sampler", "mask schedule and the enhanced-sampler tricks (arXiv 2411.10781 §3); a "
                                  "flag left out keeps the model's setting (or --sampler's, --sampler-config's)")
    add_preset_argument(g)
    g.add_argument("--sampler-config", type=argtypes.existing_file("sampler config"), default=None, metavar="FILE",
                   help="JSON/YAML file of SamplerConfig fields (applied after --sampler)")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="mask schedule: cosine cos(πt/2), linear 1−t, pow (1−t)^ρ, root 1−t^ρ")
    g.add_argument("--inpaint-schedule", choices=(*SCHEDULES, "same"), default=None,
                   help="mask schedule of inpainting and outpainting (default linear, as the official Meissonic "
                        "inpainting; same: --schedule's)")
    g.add_argument("--rho", type=argtypes.number(minimum=0, above=True), default=None,
                   help="ρ of the pow/root schedules")
    g.add_argument("--gumbel-temperature", type=argtypes.number(minimum=0),
                   nargs=2, default=None, metavar=("START", "END"),
                   help="temperature of the Gumbel noise on the keep/re-mask confidences, linear from START "
                        "at the first step to END at the last (official: 2 0)")
    g.add_argument("--noise", choices=NOISE_CURVES, default=None, help="noise regularization curve I(t)")
    g.add_argument("--noise-scale", type=argtypes.number(minimum=0, maximum=MAX_NOISE_SCALE), default=None,
                   help=f"α of the noise curve, at most {MAX_NOISE_SCALE:g} (the demo uses 2)")
    g.add_argument("--diff-z", type=argtypes.number(0, 100), default=None, metavar="PERCENT",
                   help="differential sampling: percent z of tokens resampled (0 = off, paper: 75)")
    g.add_argument("--diff-resample", choices=RESAMPLE_RULES, default=None,
                   help="differential sampling's distribution: abs |p_i − p_{i−1}| (paper) or clipped (official demo)")
    g.add_argument("--zsampling", choices=ZSAMPLING_VARIANTS, default=None,
                   help="Z-sampling: masked (paper), random / recover (ablations), off")
    g.add_argument("--inversion-cfg", type=argtypes.number(minimum=-MAX_GUIDANCE, maximum=MAX_GUIDANCE), default=None,
                   help=f"CFG scale of Z-sampling's inversion pass, in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}] (the "
                        "paper's best is near −1)")
    g.add_argument("--zsampling-steps", type=parse_steps, default=None, metavar="SPEC",
                   help="Z-steps: 'all' (every step but the last), 'START:STOP', or 'I,J,…'")
    g.add_argument("--zsampling-remask", choices=REMASK_RULES, default=None,
                   help="masked Z-sampling's re-mask rule: paper (lowest confidence) or official (the demo's)")
    g.add_argument("--momentum", type=int, choices=MOMENTUM_ORDERS, default=None,
                   help="momentum-based solver order: 0 off, 1 first order (= vanilla), 2 second order")
    add_reuse_arguments(g)
    return g


def add_preset_argument(group) -> None:
    """--sampler NAME: a preset of mgtq.sampling.presets (default None = keep the base config)."""
    group.add_argument("--sampler", choices=PRESET_NAMES, default=None,
                       help="preset: vanilla (official), paper-combo (the paper's combination: cosine, noise, "
                            "differential 75%%, masked Z-sampling), paper-combo-root (the same on 1−t^0.6) or fast "
                            "(vanilla with context reuse: --reuse-interval 4 --reuse-group cells --reuse-warmup 5)")


def add_reuse_arguments(group) -> None:
    """The --reuse-* flags of ReuseConfig (each default None = keep the base config's value)."""
    group.add_argument("--reuse-interval", type=argtypes.integer(minimum=1), default=None, metavar="N",
                       help="context reuse: a full step every N steps, local steps (a few tokens, cached K/V) between; "
                            "1 = off")
    group.add_argument("--reuse-group", choices=GROUP_RULES, default=None,
                       help="context reuse: tokens the local steps compute: confidence (ReCAP's group), cells (the "
                            "group in whole 2×2 cells: fewer transformer tokens with feature compression) or masked "
                            "(every masked token)")
    group.add_argument("--reuse-warmup", type=argtypes.integer(minimum=0), default=None, metavar="STEPS",
                       help="context reuse: the first STEPS steps are all full steps")
    group.add_argument("--reuse-refresh", type=argtypes.number(0, 1), default=None, metavar="FRACTION",
                       help="context reuse: selective K/V refresh (MARché): each local step also recomputes this "
                            "fraction of the decoded tokens, those the previous local step attended to most; 0 = off")


# flag attribute → dotted SamplerConfig path
_FLAG_PATHS = {
    "schedule": "schedule", "rho": "rho", "gumbel_temperature": "gumbel_temperature",
    "noise": "noise.curve", "noise_scale": "noise.scale",
    "diff_z": "differential.percent", "diff_resample": "differential.resample",
    "zsampling": "zsampling.variant", "inversion_cfg": "zsampling.inversion_cfg", "zsampling_remask": "zsampling.remask",
    "momentum": "momentum.order",
    "reuse_interval": "reuse.interval", "reuse_group": "reuse.group", "reuse_warmup": "reuse.warmup",
    "reuse_refresh": "reuse.refresh",
}


def sampler_config_from_args(args: argparse.Namespace, base: SamplerConfig, **fields) -> SamplerConfig:
    """The SamplerConfig the flags ask for, starting from `base` (flags not given keep base's values); `fields`
    (a command's --steps / --cfg: num_steps=…, guidance_scale=…; None = not given) are set with the flags, so that
    the flags are checked against them (--zsampling-steps against --steps, not the checkpoint's steps)."""
    config = base
    if getattr(args, "sampler", None) is not None:
        config = SamplerConfig.preset(args.sampler, base=config)
    if getattr(args, "sampler_config", None) is not None:
        config = config.with_overrides(flatten_overrides(load_sampler_file(args.sampler_config)))
    overrides = {path: getattr(args, flag) for flag, path in _FLAG_PATHS.items()
                 if getattr(args, flag, None) is not None}
    inpaint = getattr(args, "inpaint_schedule", None)
    if inpaint is not None:
        overrides["inpaint_schedule"] = None if inpaint == "same" else inpaint
    steps = getattr(args, "zsampling_steps", None)
    if steps is not None:
        overrides["zsampling.steps"] = None if steps == "all" else steps  # None = every step but the last
    overrides.update((k, v) for k, v in fields.items() if v is not None)
    return config.with_overrides(overrides) if overrides else config


def reuse_from_args(args: argparse.Namespace, base: ReuseConfig) -> ReuseConfig | None:
    """The ReuseConfig the --reuse-* flags ask for on top of `base`, or None when none of them is given."""
    given = {path.split(".", 1)[1]: getattr(args, flag) for flag, path in _FLAG_PATHS.items()
             if path.startswith("reuse.") and getattr(args, flag, None) is not None}
    return dataclasses.replace(base, **given) if given else None


