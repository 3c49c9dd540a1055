"""Named transformer configurations of the Meissonic family.

`meissonic-1024` is the released 1024px config (1.0B params, 14 + 28 blocks). The small presets are
for tests and for mgtq's embedded default model; all share the official config keys.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights

from mgtq.models.transformer import MeissonicTransformer

PRESETS: dict[str, dict] = {
    "meissonic-1024": dict(
        num_layers=14, num_single_layers=28, num_attention_heads=8, attention_head_dim=128,
        joint_attention_dim=1024, pooled_projection_dim=1024, axes_dims_rope=(16, 56, 56),
        vocab_size=8256, codebook_size=8192, downsample=True, upsample=True,
    ),
    # Monetico-like 512px variant: no feature compression.
    "meissonic-512-nodown": dict(
        num_layers=14, num_single_layers=28, num_attention_heads=8, attention_head_dim=128,
        joint_attention_dim=1024, pooled_projection_dim=1024, axes_dims_rope=(16, 56, 56),
        vocab_size=8256, codebook_size=8192, downsample=False, upsample=False,
    ),
    # mgtq's embedded default (trained on the shapes world): D = 128, 2 + 4 blocks.
    "tiny-shapes": dict(
        num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32,
        joint_attention_dim=128, pooled_projection_dim=128, axes_dims_rope=(8, 12, 12),
        vocab_size=264, codebook_size=256, downsample=True, upsample=True,
    ),
    # The same network in the layout without feature compression (Meissonic's 512px models): the
    # blocks see the 16×16 VQ grid, 4× the tokens of "tiny-shapes".
    "tiny-shapes-16x16": dict(
        num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32,
        joint_attention_dim=128, pooled_projection_dim=128, axes_dims_rope=(8, 12, 12),
        vocab_size=264, codebook_size=256, downsample=False, upsample=False,
    ),
    # Smallest sensible member, for unit tests.
    "test-micro": dict(
        num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        vocab_size=40, codebook_size=32, downsample=True, upsample=True,
    ),
}


def preset_config(name: str, **overrides) -> dict:
    """The config dict of a preset, with overrides applied."""
    if name not in PRESETS:
        raise KeyError(f"unknown transformer preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}


def build_transformer(name: str, device: str | torch.device = "cpu", empty: bool = False, **overrides) -> MeissonicTransformer:
    """Build a preset with random init; `empty=True` allocates nothing (meta device)."""
    config = preset_config(name, **overrides)
    if empty:
        with init_empty_weights():
            return MeissonicTransformer(**config)
    return MeissonicTransformer(**config).to(device)
