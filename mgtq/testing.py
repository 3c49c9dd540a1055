"""Random-weight builders: whole pipelines for tests and smoke runs, full-size transformers for benchmarks.

Memory and latency do not depend on weight values, so `mgtq bench` measures full-size configs built
here: the transformer is created on the meta device and filled directly in its final dtype; a
quantized one is built the way a checkpoint is loaded (`mgtq.quantization.checkpoint.build_empty`,
then random packed int4 codes and scales), so no float copy of its Linears ever exists.
"""

from __future__ import annotations

import torch
from torch import nn

from mgtq.factory import tiny_text_encoder, tiny_vqmodel
from mgtq.models.presets import build_transformer
from mgtq.pipeline import MGTPipeline, PipelineSettings
from mgtq.quantization import checkpoint
from mgtq.sampling import SamplerConfig
from mgtq.text import build_word_tokenizer
from mgtq.utils import derive_seed

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


# ------------------------------------------------------------------------------------ pipelines
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
    return MGTPipeline(transformer.eval(), vqvae.eval(), text_encoder.eval(), tokenizer, settings)


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

    from mgtq.models import MeissonicTransformer

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
    model = nn.Module.to(checkpoint.build_empty(config, checkpoint.Manifest(layers=layers)), float_dtype)
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


def random_quantized_pipeline(fraction_a8: float = 1 / 3, seed: int = 0, **kwargs) -> MGTPipeline:
    """`build_random_pipeline` with its transformer replaced by a random W4A8/W4A16 one of the same config
    (float parts fp32; a seeded `fraction_a8` of the Linears W4A8 with input scale 0.05)."""
    import random

    from mgtq.models.transformer import plain_config
    from mgtq.quantization import linear_names

    pipe = build_random_pipeline(seed=seed, **kwargs)
    config = plain_config(pipe.transformer.config)
    names = linear_names(pipe.transformer)
    a8 = set(random.Random(derive_seed(seed, "a8")).sample(sorted(names), round(fraction_a8 * len(names))))
    pipe.transformer = random_quantized_transformer(config, a8, dict.fromkeys(a8, 0.05), seed, torch.float32)
    return pipe


__all__ = ["build_random_pipeline", "empty_transformer", "fill_random_", "materialize_random_",
           "random_float_transformer", "random_quantized_pipeline", "random_quantized_transformer"]


def micro_forward_inputs(model, batch: int = 2, grid: int = 8, seed: int = 0) -> dict:
    """Random forward keyword arguments for a small MeissonicTransformer: token ids (batch, grid, grid), text, t."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randint(0, cfg.codebook_size, (batch, grid, grid), generator=g),
        encoder_hidden_states=torch.randn(batch, 5, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
    )


def quantized_micro_transformer() -> nn.Module:
    """The "test-micro" transformer with every other Linear W4A8 and the rest W4A16 (both kinds, many-row
    image-stream and few-row adaLN inputs)."""
    from mgtq.quantization import W4A8Config, W4A16Config, linear_names, quantize_

    torch.manual_seed(0)
    model = build_transformer("test-micro").eval()
    a8 = linear_names(model)[::2]
    quantize_(model, W4A16Config(), overrides=dict.fromkeys(a8, W4A8Config()), input_scales=dict.fromkeys(a8, 0.05))
    return model


def tiny_recipe_dict(model_dir, **sections) -> dict:
    """A seconds-long SCQ recipe (as a mapping) for the pipeline folder `model_dir`.

    Each keyword names a recipe section whose keys override the defaults here
    (`qat={"steps": 4}`); a non-mapping value replaces the section whole.
    """
    data = {
        "model": str(model_dir),
        "prompts": {"source": "grammar", "count": 8},
        "synthesis": {"num_steps": 2, "guidance_scale": 3.0, "batch_size": 8},
        "qat": {"steps": 4, "lr": 2.0e-3, "batch_size": 4, "save_every": 4},
        "magnitudes": {"mask_ratios": [0.5, 1.0], "batch_size": 8},
        "secondary": {"fraction": 1 / 3, "selection": "lowest"},
        "export": {"dtype": "float32"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data
