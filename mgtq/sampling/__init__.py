"""Sampling: the MaskGIT loop of Meissonic, the paper's enhanced tricks, schedules, configuration."""

from mgtq.sampling.config import (DifferentialConfig, MomentumConfig, NoiseConfig, SamplerConfig,
                                  ZSamplingConfig)
from mgtq.sampling.maskgit import SampleResult, SamplerHooks, StepState, maskgit_step, sample
from mgtq.sampling.presets import PRESET_NAMES
from mgtq.sampling.schedules import mask_ratio, num_masked_after_step, timestep_value

__all__ = ["SamplerConfig", "NoiseConfig", "DifferentialConfig", "ZSamplingConfig", "MomentumConfig",
           "PRESET_NAMES", "SamplerHooks", "StepState", "SampleResult", "maskgit_step", "sample", "mask_ratio",
           "num_masked_after_step", "timestep_value"]
