"""SCQ step 4 (paper §4.1): secondary calibration — which layers get int8 activations, and their scales.

SCQ gives int8 activations to the `fraction` of layers with the lowest input magnitude (step 3),
switches those layers to per-channel int4 weights (what the int8 GEMM rescales by), and calibrates a
static per-tensor input scale for each on the calibration data.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mgtq.models.transformer import MeissonicTransformer
from mgtq.quantization import FakeQuantLinear, input_scales_from_stats
from mgtq.sampling import SamplerConfig
from mgtq.scq.magnitudes import record_activation_stats
from mgtq.scq.recipe import MagnitudeConfig, SecondaryConfig
from mgtq.scq.synthesis import CalibrationData
from mgtq.utils import set_submodule


def select_a8_layers(magnitudes: dict[str, float], fraction: float, selection: str, seed: int = 0) -> list[str]:
    """The layers that get int8 activations: SCQ takes the round(fraction·L) of lowest magnitude.

    "random" draws as many at random (the paper's ablation); "all" takes every layer.
    """
    names = sorted(magnitudes)
    if selection == "all":
        return names
    k = round(fraction * len(names))
    if selection == "random":
        return sorted(random.Random(seed).sample(names, k))
    if selection == "lowest":
        return sorted(sorted(names, key=lambda n: (magnitudes[n], n))[:k])
    raise ValueError(f"unknown selection {selection!r}")


def use_per_channel_weights_(model: torch.nn.Module, name: str) -> None:
    """Give fake-quant layer `name` per-output-channel int4 weights (the grid the int8 GEMM needs)."""
    layer = model.get_submodule(name)
    if not isinstance(layer, FakeQuantLinear):
        raise TypeError(f"{name} is not a fake-quant layer")
    if layer.group_size != layer.in_features:
        set_submodule(model, name, FakeQuantLinear.from_linear(layer, None))


def calibrate_input_scales_(model: MeissonicTransformer, a8: list[str], data: CalibrationData, cfg: SecondaryConfig,
                            magnitude_cfg: MagnitudeConfig, sampler: SamplerConfig, progress: bool = True,
                            desc: str = "secondary") -> dict[str, float]:
    """Switch the A8 layers of fake-quant `model` to per-channel weights (so the calibration sees the
    exported weights), calibrate and set their static input scales; returns {layer: scale}."""
    for name in a8:
        use_per_channel_weights_(model, name)
    if not a8:
        return {}
    stats = record_activation_stats(model, data, magnitude_cfg, sampler, a8, progress, desc=desc)
    scales = {n: float(s) for n, s in input_scales_from_stats(stats, cfg.scale_method, cfg.percentile).items()}
    for name, scale in scales.items():
        model.get_submodule(name).set_input_scale(scale)
    return scales


def plot_magnitudes(magnitudes: dict[str, float], a8: list[str], statistic: str, path: Path) -> None:
    """Sorted per-layer magnitudes (log scale), the A8 set highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(magnitudes, key=lambda n: magnitudes[n])
    values = [magnitudes[n] for n in names]
    colours = ["tab:orange" if n in set(a8) else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    ax.bar(range(len(names)), values, color=colours, width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel(f"transformer Linear layers, sorted by input {statistic}")
    ax.set_ylabel(f"input {statistic}")
    ax.set_title(f"SCQ activation magnitudes — orange: int8 activations ({len(a8)} of {len(names)} layers)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
