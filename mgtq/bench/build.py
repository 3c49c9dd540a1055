"""Build what a case measures: the transformer in a format (mgtq.bench.formats), the pipeline around it.

Random-weight presets are built like a packed checkpoint is loaded (`mgtq.models.random`): on the meta
device, each quantized Linear filled with random packed int4 codes + scales, the other parts
materialized in their final dtype, so peak memory is that of the format, never of a float copy.
Folders load through `mgtq.pipeline` (float or `mgtq.quantization.checkpoint`).
"""

from __future__ import annotations

import torch
from torch import nn

from mgtq.bench.formats import Format
from mgtq.bench.source import ModelSource, forward_inputs, transformer_config
from mgtq.dtypes import parse_dtype
from mgtq.models.random import empty_transformer, random_float_transformer, random_quantized_transformer
from mgtq.quantization.selection import A8_FRACTION, select_a8_layers

def a8_layers_for(base: str, names: list[str], seed: int) -> set[str]:
    """Layers that run W4A8: all for w4a8, for scq SCQ's count drawn at random (its "random" selection),
    none otherwise. On random weights magnitudes mean nothing; the count is what matters for speed and size."""
    if base not in ("w4a8", "scq"):
        return set()
    return set(select_a8_layers(dict.fromkeys(names, 0.0), A8_FRACTION, "all" if base == "w4a8" else "random",
                                seed))


def needs_input_scales(source: ModelSource, formats: tuple[str, ...]) -> bool:
    """Whether static int8 scales must be measured before building these formats."""
    wanted = {"w4a8", "scq"} & {Format.parse(f).base for f in formats}
    if source.kind == "quantized-dir":
        wanted.discard("scq")  # the checkpoint brings its calibrated scales
    return bool(wanted)


def linear_names_of(config: dict) -> list[str]:
    """The quantizable Linears of a transformer config (built on the meta device)."""
    from mgtq.quantization import linear_names

    return linear_names(empty_transformer(config, torch.bfloat16))


def build_transformer(source: ModelSource, name: str, input_scales: dict[str, float] | None, seed: int = 0,
                      device: str = "cpu") -> tuple[nn.Module, list[str]]:
    """(transformer in format `name`, in eval mode on `device`; notes on how it was built)."""
    fmt = Format.parse(name)
    if fmt.cached:
        model, notes = build_transformer(source, name.removesuffix("-cached"), input_scales, seed, device)
        return with_weight_cache(model, notes)
    notes: list[str] = []
    if source.kind == "quantized-dir" and fmt.base == "scq" and fmt.group_size is None:
        from mgtq.pipeline import load_transformer

        model = load_transformer(source.folder / "transformer", dtype=torch.bfloat16)
        notes.append("scq: the checkpoint as exported (its manifest's A8 layers and calibrated scales)")
        return model.eval().requires_grad_(False).to(device), notes
    if source.kind == "float-dir":
        return _from_float_folder(source, fmt, input_scales, seed, device)
    if source.kind == "quantized-dir":
        notes.append(f"{fmt.base}: built from the checkpoint's config with random weights (the folder holds only "
                     "the quantized SCQ weights)")
    config = transformer_config(source)
    if fmt.is_float:
        return random_float_transformer(config, parse_dtype(fmt.float_dtype), seed).to(device), notes
    names = linear_names_of(config)
    a8 = a8_layers_for(fmt.base, names, seed)
    if fmt.base == "scq":
        notes.append(f"scq: random third of the Linears as W4A8 ({len(a8)} of {len(names)}, seed {seed}), static "
                     "int8 scales from one forward on random inputs (speed and size do not depend on values)")
    elif fmt.base == "w4a8":
        notes.append("w4a8: static int8 scales from one forward on random inputs")
    if fmt.group_size:
        notes.append(f"{fmt.base}: W4A16 layers int4 in groups of {fmt.group_size} input columns")
    model = random_quantized_transformer(config, a8, input_scales, seed, group_size=fmt.group_size)
    return model.to(device), notes


def quantize_in_format_(model: nn.Module, fmt: Format, input_scales: dict[str, float] | float, seed: int = 0) -> set[str]:
    """Quantize the float `model` in place the way format `fmt` is built (weight cache aside: see
    `with_weight_cache`): every Linear W4A16 (in `fmt.group_size` groups), the `a8_layers_for` layers
    W4A8 with `input_scales` (a mapping by layer, or one value for all). Returns the W4A8 layer names."""
    from mgtq.quantization import W4A8Config, W4A16Config, linear_names, quantize_

    a8 = a8_layers_for(fmt.base, linear_names(model), seed)
    scales = {name: input_scales for name in a8} if isinstance(input_scales, float) else input_scales
    # the chosen layers by exact name (their names hold no fnmatch wildcards), with the given scales
    quantize_(model, W4A16Config(fmt.group_size), overrides={name: W4A8Config() for name in sorted(a8)},
              input_scales=scales)
    return a8


def with_weight_cache(model: nn.Module, notes: list[str]) -> tuple[nn.Module, list[str]]:
    from mgtq.quantization import W4A8Linear

    layers = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    for layer in layers:
        layer.enable_weight_cache("auto")
    kinds = sorted({layer.weight_cache for layer in layers})
    notes.append(f"int8 weight cache ({'/'.join(kinds)}) enabled on {len(layers)} W4A8 layers: +1 byte per cached "
                 "weight, included in the weight bytes")
    return model, notes


def _from_float_folder(source: ModelSource, fmt: Format, input_scales, seed: int, device: str):
    from mgtq.pipeline import load_transformer
    from mgtq.quantization import linear_names

    notes = []
    model = load_transformer(source.folder / "transformer", dtype=parse_dtype(fmt.float_dtype))
    if not fmt.is_float:
        count = len(linear_names(model))
        a8 = quantize_in_format_(model, fmt, input_scales, seed)
        a8_note = f"; {len(a8)} of {count} Linears W4A8 with scales from one pass on random inputs" if a8 else ""
        notes.append(f"{fmt.base}: post-training quantized at load from the float checkpoint (peak memory includes "
                     f"its bf16 weights){a8_note}")
    return model.eval().requires_grad_(False).to(device), notes


def scales_from_random_inputs(source: ModelSource, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Static int8 input scale (absmax / 127) of every Linear from one CFG forward of bf16 on random inputs.

    On random weights the scales only decide int8 clipping, which changes neither speed nor size.
    """
    from mgtq.quantization import calibrate_activations, input_scales_from_stats

    model, _ = build_transformer(source, "bf16", None, seed, device)
    with torch.inference_mode(), calibrate_activations(model) as stats:
        model(**forward_inputs(source, torch.bfloat16, device, seed=seed))
    return {name: float(scale) for name, scale in input_scales_from_stats(stats).items()}


# ------------------------------------------------------------------------------------- pipeline
def build_pipeline(source: ModelSource, transformer, dtype: torch.dtype, steps: int, seed: int, device: str,
                   vq_empty: bool):
    """MGTPipeline around `transformer`; with `vq_empty` the VQ is a meta-device placeholder.

    A folder's other components and settings load through `MGTPipeline.from_pretrained` (so a separate
    CLIP folder works as for `mgtq.load`); a preset gets small random stand-ins sized for its resolution.
    """
    from mgtq.pipeline import MGTPipeline

    vq = build_vq(source, seed, empty=True) if vq_empty else None
    if source.kind == "preset":
        tokenizer, text_encoder = _random_text_parts(source, dtype, seed)
        pipe = MGTPipeline(transformer, vq or build_vq(source, seed), text_encoder, tokenizer,
                           _pipeline_settings(source, steps))
    else:
        pipe = MGTPipeline.from_pretrained(source.folder, text_encoder=source.text_encoder, torch_dtype=dtype,
                                           transformer=transformer, vqvae=vq)
        pipe.settings = _pipeline_settings(source, steps, pipe.settings)
    pipe.text_encoder.to(device)
    if not vq_empty:
        pipe.vqvae.to(device)
    return pipe


def _random_text_parts(source: ModelSource, dtype: torch.dtype, seed: int):
    from mgtq.models.random import tiny_text_encoder
    from mgtq.shapes import vocabulary
    from mgtq.text import build_word_tokenizer

    config = transformer_config(source)
    tokenizer = build_word_tokenizer(vocabulary(), max_length=source.text_length)
    with torch.random.fork_rng(devices=[]):  # module init uses the global RNG; keep the caller's stream
        torch.default_generator.manual_seed(seed + 1)  # CPU only: the stream fork_rng gives back
        encoder = tiny_text_encoder(tokenizer, config["joint_attention_dim"], config["pooled_projection_dim"],
                                    layers=source.text_layers, heads=source.text_heads)
    return tokenizer, encoder.to(dtype).eval()


def build_vq(source: ModelSource, seed: int = 0, empty: bool = False):
    """The VQ decoder: the folder's, or a preset's random stand-in. `empty`: on the meta device, holding
    the config only (the offloading mode loads the real one later)."""
    from diffusers import VQModel

    from mgtq.vq import VQConfig, vq_model_kwargs
    from mgtq.vq import build_vq as random_vq

    if source.kind != "preset":
        folder = source.folder / "vqvae"
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights():
                return VQModel.from_config(VQModel.load_config(folder))
        from mgtq.pipeline import load_component

        return load_component(VQModel, folder).eval()
    config = VQConfig(block_out_channels=source.vq_channels, latent_channels=source.vq_latent_channels,
                      num_vq_embeddings=transformer_config(source)["codebook_size"],
                      norm_num_groups=min(8, min(source.vq_channels)), image_size=source.resolution)
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return VQModel(**vq_model_kwargs(config))
    return random_vq(config, seed=seed + 2).eval()


def _pipeline_settings(source: ModelSource, steps: int, settings=None):
    """The benchmark runs' settings: the source's resolution, `steps` steps, CFG on (a batch of 2 per call).

    `settings`: those a folder's pipeline loaded with."""
    import dataclasses

    from mgtq.pipeline import PipelineSettings
    from mgtq.sampling import SamplerConfig

    if settings is not None:
        sampler = settings.sampler.replace(num_steps=steps, guidance_scale=source.guidance_scale)
        return dataclasses.replace(settings, sampler=sampler)
    sampler = SamplerConfig(num_steps=steps, guidance_scale=source.guidance_scale, timestep_convention="mask_ratio")
    return PipelineSettings(sampler=sampler, resolution=source.resolution, image_range="-1,1")
