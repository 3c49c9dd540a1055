"""Models: Meissonic's transformer and its configuration presets."""

from mgtq.models.presets import PRESETS, build_transformer, preset_config
from mgtq.models.transformer import MeissonicTransformer, TokenMerge, apply_rope, rope_tables

__all__ = ["MeissonicTransformer", "TokenMerge", "apply_rope", "rope_tables", "PRESETS", "preset_config", "build_transformer"]
