"""Build pipelines from configs with random weights: for tests, smoke runs and size/speed benchmarks.

Memory and latency do not depend on weight values, so benchmarks of the full-size configs use these
builders (the transformer on the meta device first, then filled with random values).
"""

from __future__ import annotations

import torch
from diffusers import VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from mgtq.models.presets import build_transformer
from mgtq.pipeline import MGTPipeline, PipelineSettings
from mgtq.sampling import SamplerConfig
from mgtq.text import build_word_tokenizer



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


def build_random_pipeline(
    preset: str = "test-micro",
    resolution: int = 64,
    vq_factor: int = 4,
    words: list[str] | None = None,
    seed: int = 0,
    sampler: SamplerConfig | None = None,
    text_max_length: int = 24,
) -> MGTPipeline:
    """A complete pipeline with random weights (real component classes), e.g. 64×64 images in seconds."""
    torch.manual_seed(seed)  # module init draws from the global generator; make it repeatable
    transformer = build_transformer(preset)
    cfg = transformer.config
    from mgtq.shapes import vocabulary

    tokenizer = build_word_tokenizer(words or vocabulary(), max_length=text_max_length)
    text_encoder = tiny_text_encoder(tokenizer, cfg.joint_attention_dim, cfg.pooled_projection_dim)
    vqvae = tiny_vqmodel(cfg.codebook_size, factor=vq_factor)
    settings = PipelineSettings(
        sampler=sampler or SamplerConfig(num_steps=8, guidance_scale=3.0, timestep_convention="mask_ratio"),
        resolution=resolution, image_range="-1,1",
    )
    pipe = MGTPipeline(transformer.eval(), vqvae.eval(), text_encoder.eval(), tokenizer, settings)
    return pipe
