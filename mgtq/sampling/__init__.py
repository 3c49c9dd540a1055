"""Sampling: the MaskGIT loop of Meissonic, the paper's enhanced tricks, schedules, configuration."""

from mgtq.sampling.config import (DifferentialConfig, MomentumConfig, NoiseConfig, SamplerConfig,
                                  ZSamplingConfig)
from mgtq.sampling.maskgit import SampleResult, SamplerHooks, StepState, classifier_free_guidance, sample
from mgtq.sampling.presets import PRESET_NAMES
from mgtq.sampling.schedules import mask_ratio, timestep_value
from mgtq.sampling.start import StartState

__all__ = ["SamplerConfig", "NoiseConfig", "DifferentialConfig", "ZSamplingConfig", "MomentumConfig",
           "PRESET_NAMES", "SamplerHooks", "StepState", "SampleResult", "StartState", "sample",
           "classifier_free_guidance", "mask_ratio",
           "timestep_value"]
