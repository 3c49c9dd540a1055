"""Models with random weights: the small VQ and CLIP architectures, and full-size random transformers.

Memory and latency do not depend on weight values, so `mgtq bench` measures full-size configs built
here: the transformer is created on the meta device and filled directly in its final dtype; a
quantized one is built the way a checkpoint is loaded (`mgtq.quantization.checkpoint.build_empty`,
then random packed int4 codes and scales), so no float copy of its Linears ever exists. The embedded
model's training starts from `tiny_text_encoder`; tests build whole pipelines from these parts
(the tests' `testkit`).
"""

from __future__ import annotations

import torch
from diffusers import VQModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from mgtq.models.transformer import MeissonicTransformer
from mgtq.quantization import checkpoint
from mgtq.seeding import derive_seed

# Random weights: uniform with std 0.02 (like common transformer inits), so activations stay finite
# through 42 blocks and a calibration pass sees ordinary magnitudes.
WEIGHT_STD = 0.02
# int4 codes drawn uniformly from [-8, 7] have std ≈ 4.6; this per-channel scale gives weights of
# std ≈ 0.02, like the float builders.
INT4_SCALE = WEIGHT_STD / 4.6
# Drawing 1e9 random numbers from one CPU generator is serial (≈10–20 s for Meissonic-1024), so a
# tensor is filled by tiling a block of this many random values: same distribution, and a layer
# still differs from every other one (own generator), which is all speed and size measurements need.
RANDOM_BLOCK = 1 << 22


# ------------------------------------------------------------------------------ architectures
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


# ---------------------------------------------------------------------------------- random fill
def _generator(seed: int, name: str) -> torch.Generator:
    # One generator per tensor name: a layer's values do not depend on build order or format.
    return torch.Generator().manual_seed(derive_seed(seed, name))


def _tile_(flat: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    for start in range(0, flat.numel(), block.numel()):
        end = min(flat.numel(), start + block.numel())
        flat[start:end].copy_(block[: end - start])
    return flat


def fill_random_(tensor: torch.Tensor, name: str, is_norm_weight: bool, seed: int) -> torch.Tensor:
    """Fill in place: norm weights 1, other 1-D tensors (biases) 0, the rest uniform with std 0.02
    (tiled from a block of RANDOM_BLOCK random values)."""
    with torch.no_grad():
        if is_norm_weight:
            return tensor.fill_(1.0)
        if tensor.dim() <= 1:
            return tensor.zero_()
        bound = WEIGHT_STD * 3**0.5
        block = torch.empty(min(tensor.numel(), RANDOM_BLOCK), dtype=tensor.dtype, device=tensor.device)
        block.uniform_(-bound, bound, generator=_generator(seed, name))
        _tile_(tensor.view(-1), block)
        return tensor


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def materialize_random_(model: nn.Module, seed: int, device: str = "cpu") -> nn.Module:
    """Replace every meta parameter/buffer of `model` by a random tensor of the same dtype on `device`.

    Real (already materialized) tensors are left alone, so quantized layers filled beforehand stay.
    """
    for mod_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                full = f"{mod_name}.{name}" if mod_name else name
                value = torch.empty(param.shape, dtype=param.dtype, device=device)
                fill_random_(value, full, _is_norm(module) and name == "weight", seed)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                full = f"{mod_name}.{name}" if mod_name else name
                setattr(module, name, fill_random_(torch.empty(buf.shape, dtype=buf.dtype, device=device), full,
                                                   False, seed))
    return model


# ------------------------------------------------------------------------------- transformers
def empty_transformer(config: dict, dtype: torch.dtype) -> nn.Module:
    """The transformer on the meta device (no memory), cast to `dtype` there."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = MeissonicTransformer(**config)
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules this model lacks.
    return nn.Module.to(model, dtype)


def random_float_transformer(config: dict, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A float transformer with random weights, allocated directly in `dtype` (never fp32 for bf16)."""
    model = materialize_random_(empty_transformer(config, dtype), seed)
    return model.eval().requires_grad_(False)


def random_quantized_transformer(config: dict, a8_layers: set[str], input_scales: dict[str, float] | None,
                                 seed: int = 0, float_dtype: torch.dtype = torch.bfloat16,
                                 group_size: int | None = None) -> nn.Module:
    """Every Linear quantized (W4A8 if in `a8_layers`, else W4A16 per channel or in groups of
    `group_size` input columns) with random int4 codes, the other parts random in `float_dtype`:
    built from tensors only, like loading a checkpoint."""
    from mgtq.quantization import linear_names

    names = linear_names(empty_transformer(config, float_dtype))
    missing = sorted(set(a8_layers) - set(input_scales or {}))
    if missing:
        raise KeyError(f"layer {missing[0]} is W4A8 but has no calibrated input scale")
    layers = {n: checkpoint.LayerScheme("w4a8") if n in a8_layers else checkpoint.LayerScheme("w4a16", group_size)
              for n in names}
    empty = checkpoint.build_empty(MeissonicTransformer, config, checkpoint.Manifest(layers=layers))
    model = nn.Module.to(empty, float_dtype)
    for name in names:
        layer = model.get_submodule(name)
        checkpoint.assign_layer_(
            layer, codes=_random_codes(layer.out_features, layer.in_features // 2, seed, name),
            scales=torch.full((layer.out_features, _scale_columns(layer, name, a8_layers, group_size)), INT4_SCALE),
            input_scale=float(input_scales[name]) if name in a8_layers else None,
            bias=None if layer.bias is None else torch.zeros(layer.out_features, dtype=float_dtype))
    return materialize_random_(model, seed).eval().requires_grad_(False)


def _scale_columns(layer: nn.Module, name: str, a8_layers: set[str], group_size: int | None) -> int:
    return 1 if name in a8_layers or group_size is None else layer.in_features // group_size


def _random_codes(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    """uint8 (rows, cols): two random int4 codes per byte."""
    packed = torch.empty(rows, cols, dtype=torch.uint8)
    g = _generator(seed, f"{name}.weight_packed")
    block = torch.randint(0, 256, (min(packed.numel(), RANDOM_BLOCK),), dtype=torch.uint8, generator=g)
    return _tile_(packed.view(-1), block).view(rows, cols)
