"""Models: Meissonic's transformer and its configuration presets."""

from mgtq.models.presets import PRESETS, build_transformer, preset_config
from mgtq.models.hooks import BlockTokens, TokenHook, TokenPlan
from mgtq.models.transformer import MeissonicTransformer, apply_rope, rope_tables

__all__ = ["MeissonicTransformer", "BlockTokens", "TokenHook", "TokenPlan", "apply_rope", "rope_tables", "PRESETS", "preset_config", "build_transformer"]
