"""Mask schedules and the timestep convention — the one place the sampler, training and QAT agree.

A mask schedule σ(t), t ∈ [0, 1], is the fraction of tokens still masked after a fraction t of the
steps: σ(0) = 1 (all masked), σ(1) = 0, monotone non-increasing. Paper (arXiv 2411.10781 §3.1,
Table 2) compares cos(πt/2) (MaskGIT/Meissonic), 1 − t, (1 − t)^ρ and 1 − t^ρ.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Schedule = Literal["cosine", "linear", "pow", "root"]
TimestepConvention = Literal["mask_ratio", "step_index"]
SCHEDULES = get_args(Schedule)
TIMESTEP_CONVENTIONS = get_args(TimestepConvention)


def mask_ratio(schedule: str, t: float | torch.Tensor, rho: float = 1.0):
    """σ(t) for t in [0, 1]: cosine = cos(πt/2); linear = 1 − t; pow = (1 − t)^ρ; root = 1 − t^ρ.

    σ(1) is exactly 0 for every schedule (cos(π/2) is 6e−17 in floating point), so whatever reads
    σ at the end of sampling, such as the momentum solver's last-step fallback, sees "no mask left".
    """
    tt = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "cosine":
        out = torch.cos(tt * math.pi / 2)
    elif schedule == "linear":
        out = 1 - tt
    elif schedule == "pow":
        out = (1 - tt).clamp(min=0) ** rho
    elif schedule == "root":
        out = 1 - tt.clamp(min=0) ** rho
    else:
        raise ValueError(f"unknown mask schedule {schedule!r}; choose one of {SCHEDULES}")
    out = torch.where(tt >= 1, torch.zeros_like(out), out.clamp(0.0, 1.0))
    return float(out) if not isinstance(t, torch.Tensor) else out


def timestep_value(convention: str, step: int, num_steps: int, current_mask_ratio: float | torch.Tensor):
    """The `timestep` fed to the transformer at step `step` (the model multiplies it by 1000).

    - "mask_ratio": the fraction of input tokens that are masked (what Meissonic's training used,
      and what mgtq trains and calibrates with);
    - "step_index": the official Meissonic pipeline's value, the reversed step index T−1−i.
    Calibration and QAT must use the same convention as the sampler of the model they serve.
    """
    if convention == "mask_ratio":
        return current_mask_ratio
    if convention == "step_index":
        return float(num_steps - 1 - step)
    raise ValueError(f"unknown timestep convention {convention!r}; choose one of {TIMESTEP_CONVENTIONS}")


def timestep_for_mask_ratio(convention: str, ratio, num_steps: int, schedule: str = "cosine", rho: float = 1.0):
    """The timestep the sampler would feed for an input with this masked fraction (training/QAT side).

    "mask_ratio": the fraction itself. "step_index": the step i at which the sampler's input has
    that masked fraction, σ(i/T) = ratio, inverted numerically on the schedule, fed as T−1−i; this
    is how training and calibration match the official pipeline, which feeds step indices.
    """
    if convention == "mask_ratio":
        return ratio
    if convention != "step_index":
        raise ValueError(f"unknown timestep convention {convention!r}; choose one of {TIMESTEP_CONVENTIONS}")
    r = torch.as_tensor(ratio, dtype=torch.float64)
    grid = torch.linspace(0, 1, 4097, dtype=torch.float64)
    sigma = mask_ratio(schedule, grid, rho)  # non-increasing
    idx = torch.searchsorted(-sigma, -r.clamp(0, 1).reshape(-1), right=False).clamp(max=grid.numel() - 1)
    step = (grid[idx] * num_steps).round().clamp(0, num_steps - 1)
    out = (num_steps - 1 - step).reshape(r.shape)
    return out.float() if isinstance(ratio, torch.Tensor) else float(out)
