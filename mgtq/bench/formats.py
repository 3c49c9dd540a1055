"""Build the benchmarked transformer in one format: fp32, bf16, w4a16, w4a8, scq.

Random-weight presets are built the way a packed checkpoint is loaded: the model is created on the
meta device, each quantized Linear is built from random packed int4 codes + scales (its state
dict; no float weight ever exists), and the remaining parts (embedding, convs, norms) are
materialized directly in their final dtype. So peak memory is that of the format, never of an
fp32 or bf16 copy.

Formats (non-Linear parts stay bf16 for the quantized ones, fp32 for fp32):
    fp32, bf16  float weights
    w4a16       every Linear a W4Linear (int4 per-channel weights, bf16 activations)
    w4a8        every Linear a W4A8Linear (int4 weights, static int8 activations, int8 GEMM)
    scq         a third of the Linears W4A8, the rest W4A16: on a calibrated checkpoint the third
                its manifest names; on random weights a random third (fixed seed), with static
                scales from one calibration pass on random inputs (values do not change speed/size)
    w4a8-cached, scq-cached (opt-in)
                the same, with every W4A8Linear's int8 weight cache enabled (oneDNN prepacked
                where available): +1 byte per A8 weight, counted in the weight bytes
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import torch
from torch import nn

from mgtq.bench.source import ModelSource, transformer_config

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCQ_FRACTION = 1 / 3
# Random weights: uniform with std 0.02 (like common transformer inits), so activations stay finite
# through 42 blocks and the calibration pass sees ordinary magnitudes.
_WEIGHT_STD = 0.02


def float_dtype_of(fmt: str) -> torch.dtype:
    """dtype of the float parts: fp32 for "fp32", bf16 for everything else."""
    return torch.float32 if fmt == "fp32" else torch.bfloat16


# ------------------------------------------------------------------------------------ random fill
def _layer_generator(seed: int, name: str) -> torch.Generator:
    # One generator per tensor name: a layer's values do not depend on build order or format.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# Drawing 1e9 random numbers from one CPU generator is serial (≈10–20 s for Meissonic-1024), so a
# tensor is filled by tiling a block of this many random values: same distribution, and a layer
# still differs from every other one (own generator), which is all speed and size measurements need.
RANDOM_BLOCK = 1 << 22


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
        bound = _WEIGHT_STD * 3**0.5
        block = torch.empty(min(tensor.numel(), RANDOM_BLOCK), dtype=tensor.dtype, device=tensor.device)
        block.uniform_(-bound, bound, generator=_layer_generator(seed, name))
        _tile_(tensor.view(-1), block)
        return tensor


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def materialize_random_(model: nn.Module, seed: int, device: str = "cpu") -> nn.Module:
    """Replace every meta parameter/buffer of `model` by a random tensor of the same dtype on `device`.

    Real (already materialized) tensors are left alone, so quantized layers built beforehand stay.
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


# int4 codes drawn uniformly from [-8, 7] have std ≈ 4.6; this per-channel scale gives weights of
# std ≈ 0.02, like the float formats.
_INT4_SCALE = _WEIGHT_STD / 4.6


def random_packed_state(meta_linear: nn.Linear, name: str, seed: int, bias_dtype: torch.dtype,
                        input_scale: float | None = None) -> dict[str, torch.Tensor]:
    """State dict of a quantized Linear with random int4 codes, as a packed checkpoint holds it.

    weight_packed uint8 (N, K/2) (two random int4 per byte), weight_scale fp32 (N, 1), bias (N,)
    of `bias_dtype` when the layer has one, input_scale fp32 () for W4A8. No float weight is made.
    """
    n, k = meta_linear.out_features, meta_linear.in_features
    g = _layer_generator(seed, f"{name}.weight_packed")
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    block = torch.randint(0, 256, (min(packed.numel(), RANDOM_BLOCK),), dtype=torch.uint8, generator=g)
    state = {
        "weight_packed": _tile_(packed.view(-1), block).view(n, k // 2),
        "weight_scale": torch.full((n, 1), _INT4_SCALE, dtype=torch.float32),
    }
    if meta_linear.bias is not None:
        state["bias"] = fill_random_(torch.empty(n, dtype=bias_dtype), f"{name}.bias", False, seed)
    if input_scale is not None:
        state["input_scale"] = torch.tensor(float(input_scale), dtype=torch.float32)
    return state


def random_quantized_transformer(config: dict, a8_layers: set[str], input_scales: dict[str, float] | None,
                                 seed: int = 0, float_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Every Linear quantized (W4A8 if in `a8_layers`, else W4A16, per-channel int4) with random codes;
    the other parts random in `float_dtype`. Built from tensors only, like loading a packed checkpoint."""
    from mgtq.quantization import W4A8Linear, W4Linear, linear_names

    model = empty_transformer(config, float_dtype)
    for name in linear_names(model):
        meta = model.get_submodule(name)
        if name in a8_layers:
            if input_scales is None or name not in input_scales:
                raise KeyError(f"layer {name} is W4A8 but has no calibrated input scale")
            new = W4A8Linear.from_state_dict(random_packed_state(meta, name, seed, float_dtype, input_scales[name]))
        else:
            new = W4Linear.from_state_dict(random_packed_state(meta, name, seed, float_dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return materialize_random_(model, seed).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------ selection
def a8_layers_for(fmt: str, names: list[str], seed: int, fraction: float = SCQ_FRACTION) -> set[str]:
    """Layers that run W4A8 in `fmt`: all for w4a8, a seeded random `fraction` for scq, none otherwise.

    The random third stands in for SCQ's lowest-magnitude third on random weights, where
    magnitudes mean nothing; the count (round(fraction·n)) is what matters for speed and size.
    """
    if fmt == "w4a8":
        return set(names)
    if fmt == "scq":
        k = round(fraction * len(names))
        return set(random.Random(seed).sample(sorted(names), k))
    return set()


def manifest_a8_layers(source: ModelSource) -> set[str]:
    """The A8 layers a quantized checkpoint's manifest names."""
    from mgtq.utils import read_json

    manifest = read_json(Path(source.path) / "transformer" / "manifest.json")
    return {name for name, layer in manifest["layers"].items() if layer["scheme"] == "w4a8"}


def base_format(fmt: str) -> str:
    """"w4a8-cached" → "w4a8"; other formats unchanged."""
    return fmt.removesuffix("-cached")


def needs_calibration(source: ModelSource, formats: tuple[str, ...]) -> bool:
    """Whether static int8 scales must be calibrated before building these formats."""
    wanted = {"w4a8", "scq"} & {base_format(f) for f in formats}
    if source.kind == "quantized-dir":
        wanted.discard("scq")  # the checkpoint brings its calibrated scales
    return bool(wanted)


# ------------------------------------------------------------------------------------- building
def build_transformer_in_format(source: ModelSource, fmt: str, input_scales: dict[str, float] | None,
                                seed: int = 0, device: str = "cpu") -> tuple[nn.Module, list[str]]:
    """(transformer in eval mode on `device`, notes on how it was built)."""
    if fmt != base_format(fmt):
        return _with_weight_cache(*build_transformer_in_format(source, base_format(fmt), input_scales, seed, device))
    notes: list[str] = []
    if source.kind == "quantized-dir" and fmt == "scq":
        from mgtq.pipeline import load_transformer

        model = load_transformer(Path(source.path) / "transformer", torch_dtype=torch.bfloat16)
        notes.append("scq: the checkpoint as exported (its manifest's A8 layers and calibrated scales)")
        return model.eval().requires_grad_(False).to(device), notes
    config = transformer_config(source)
    if source.kind == "float-dir":
        return _from_float_folder(source, fmt, input_scales, seed, notes, device)
    if source.kind == "quantized-dir":
        notes.append(f"{fmt}: built from the checkpoint's config with random weights (the folder holds only "
                     "the quantized SCQ weights)")
    if fmt in FLOAT_DTYPES:
        return random_float_transformer(config, FLOAT_DTYPES[fmt], seed).to(device), notes
    names = _linear_names_of(config)
    a8 = a8_layers_for(fmt, names, seed)
    if fmt == "scq":
        notes.append(f"scq: random third of the Linears as W4A8 ({len(a8)} of {len(names)}, seed {seed}), static "
                     "int8 scales from one calibration pass on random inputs (speed and size do not depend on values)")
    elif fmt == "w4a8":
        notes.append("w4a8: static int8 scales from one calibration pass on random inputs")
    return random_quantized_transformer(config, a8, input_scales, seed).to(device), notes


def _with_weight_cache(model: nn.Module, notes: list[str]) -> tuple[nn.Module, list[str]]:
    from mgtq.quantization import W4A8Linear

    layers = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    for layer in layers:
        layer.enable_weight_cache("auto")
    kinds = sorted({layer.weight_cache for layer in layers})
    notes.append(f"int8 weight cache ({'/'.join(kinds)}) enabled on {len(layers)} W4A8 layers: +1 byte per cached "
                 "weight, included in the weight bytes")
    return model, notes


def _linear_names_of(config: dict) -> list[str]:
    from mgtq.quantization import linear_names

    return linear_names(empty_transformer(config, torch.bfloat16))


def _from_float_folder(source, fmt, input_scales, seed, notes, device):
    from mgtq.pipeline import load_transformer
    from mgtq.quantization import linear_names, quantize_weights_

    model = load_transformer(Path(source.path) / "transformer", torch_dtype=float_dtype_of(fmt))
    if fmt not in FLOAT_DTYPES:
        names = linear_names(model)
        a8 = a8_layers_for(fmt, names, seed)
        quantize_weights_(model, a8_layers=a8, input_scales=input_scales)
        a8_note = f"; {len(a8)} of {len(names)} Linears W4A8 with scales from one pass on random inputs" if a8 else ""
        notes.append(f"{fmt}: post-training quantized at load from the float checkpoint (peak memory includes "
                     f"its bf16 weights){a8_note}")
    return model.eval().requires_grad_(False).to(device), notes


def calibrate_input_scales(source: ModelSource, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Static int8 input scale (absmax / 127) of every Linear from one CFG forward on random inputs.

    Runs the bf16 model: the fastest float model here; on random weights the scales only decide
    int8 clipping, which changes neither speed nor size.
    """
    from mgtq.bench.source import forward_inputs
    from mgtq.quantization import calibrate_activations, input_scales_from_stats

    model, _ = build_transformer_in_format(source, "bf16", None, seed, device)
    inputs = forward_inputs(source, torch.bfloat16, device, seed=seed)
    with torch.inference_mode(), calibrate_activations(model) as stats:
        model(**inputs)
    return {name: float(scale) for name, scale in input_scales_from_stats(stats).items()}
