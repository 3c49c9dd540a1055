"""Small VQ and CLIP text-encoder architectures (the embedded model's, and test pipelines').

Random-weight pipelines and full-size random transformers are built in `mgtq.testing`.
"""

from __future__ import annotations

from diffusers import VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection


def tiny_vqmodel(codebook_size: int, factor: int = 4, channels: int = 32, latent_channels: int = 16) -> VQModel:
    """A small diffusers VQModel with spatial factor `factor` (a power of two) and token lookup on."""
    levels = factor.bit_length()  # factor 4 → 3 encoder blocks (two downsamples)
    if 2 ** (levels - 1) != factor:
        raise ValueError(f"VQ factor must be a power of two, got {factor}")
    return VQModel(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(channels,) * levels, layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=min(8, channels), num_vq_embeddings=codebook_size, vq_embed_dim=latent_channels,
        lookup_from_codebook=True, force_upcast=False,
    )


def tiny_text_encoder(tokenizer, hidden_size: int, projection_dim: int, layers: int = 2, heads: int = 2):
    """A small CLIPTextModelWithProjection matched to `tokenizer`'s vocabulary and special ids."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)
