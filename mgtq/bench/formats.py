"""Build the benchmarked transformer in one format: fp32, bf16, w4a16, w4a8, scq.

Random-weight presets are built by `mgtq.testing` the way a packed checkpoint is loaded: the
model is created on the meta device, each quantized Linear filled with random packed int4 codes +
scales (no float weight ever exists), and the remaining parts (embedding, convs, norms) are
materialized directly in their final dtype. So peak memory is that of the format, never of an
fp32 or bf16 copy. Folders load through `mgtq.pipeline.load_transformer` (float or
`mgtq.quantization.checkpoint`).

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
    w4a16-g64, scq-g64, … (-g32/-g64/-g128)
                the W4A16 layers with one scale per that many input columns (SCQ's
                `qat.group_size`); A8 layers stay per channel. Group scales count in the weight bytes
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from mgtq.bench.source import ModelSource, transformer_config
from mgtq.testing import empty_transformer, random_float_transformer, random_quantized_transformer
from mgtq.utils import parse_dtype

FLOAT_FORMATS = ("fp32", "bf16")
SCQ_FRACTION = 1 / 3


def float_dtype_of(fmt: str) -> torch.dtype:
    """dtype of the float parts: fp32 for "fp32", bf16 for everything else."""
    return torch.float32 if fmt == "fp32" else torch.bfloat16


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


def base_format(fmt: str) -> str:
    """"w4a8-cached" → "w4a8", "scq-g64" → "scq"; other formats unchanged."""
    return fmt.removesuffix("-cached").split("-g")[0]


def group_size_of(fmt: str) -> int | None:
    """W4A16 group size of a format: 64 for "scq-g64", None (per channel) for the others."""
    _, _, group = fmt.partition("-g")
    return int(group) if group else None


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
    if fmt.endswith("-cached"):
        return _with_weight_cache(*build_transformer_in_format(source, base_format(fmt), input_scales, seed, device))
    group_size = group_size_of(fmt)
    fmt = base_format(fmt)
    notes: list[str] = []
    if source.kind == "quantized-dir" and fmt == "scq" and group_size is None:
        from mgtq.pipeline import load_transformer

        model = load_transformer(Path(source.path) / "transformer", dtype=torch.bfloat16)
        notes.append("scq: the checkpoint as exported (its manifest's A8 layers and calibrated scales)")
        return model.eval().requires_grad_(False).to(device), notes
    config = transformer_config(source)
    if source.kind == "float-dir":
        return _from_float_folder(source, fmt, input_scales, seed, notes, device, group_size)
    if source.kind == "quantized-dir":
        notes.append(f"{fmt}: built from the checkpoint's config with random weights (the folder holds only "
                     "the quantized SCQ weights)")
    if fmt in FLOAT_FORMATS:
        return random_float_transformer(config, parse_dtype(fmt), seed).to(device), notes
    names = _linear_names_of(config)
    a8 = a8_layers_for(fmt, names, seed)
    if fmt == "scq":
        notes.append(f"scq: random third of the Linears as W4A8 ({len(a8)} of {len(names)}, seed {seed}), static "
                     "int8 scales from one calibration pass on random inputs (speed and size do not depend on values)")
    elif fmt == "w4a8":
        notes.append("w4a8: static int8 scales from one calibration pass on random inputs")
    if group_size:
        notes.append(f"{fmt}: W4A16 layers int4 in groups of {group_size} input columns")
    return random_quantized_transformer(config, a8, input_scales, seed, group_size=group_size).to(device), notes


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


def _from_float_folder(source, fmt, input_scales, seed, notes, device, group_size=None):
    from mgtq.pipeline import load_transformer
    from mgtq.quantization import W4A8Config, W4A16Config, linear_names, quantize_

    model = load_transformer(Path(source.path) / "transformer", dtype=float_dtype_of(fmt))
    if fmt not in FLOAT_FORMATS:
        names = linear_names(model)
        a8 = a8_layers_for(fmt, names, seed)
        # the chosen layers by exact name (their names hold no fnmatch wildcards), with the given scales
        quantize_(model, W4A16Config(group_size), overrides={name: W4A8Config() for name in sorted(a8)},
                  input_scales=input_scales)
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
