"""Sampling: the MaskGIT loop of Meissonic, its schedules, and its configuration."""

from mgtq.sampling.config import SamplerConfig
from mgtq.sampling.maskgit import SamplerHooks, StepState, maskgit_step, sample
from mgtq.sampling.schedules import mask_ratio, num_masked_after_step, timestep_value

__all__ = ["SamplerConfig", "SamplerHooks", "StepState", "maskgit_step", "sample", "mask_ratio",
           "num_masked_after_step", "timestep_value"]
