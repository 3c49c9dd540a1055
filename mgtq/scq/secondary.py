"""SCQ step 4 (paper §4.1): secondary calibration — which layers get int8 activations, and their scales.

SCQ gives int8 activations to the `fraction` of layers with the lowest input magnitude (step 3) —
or the lowest measured sensitivity, or a random set; the rule: mgtq.quantization.selection — switches
those layers to per-channel int4 weights (what the int8 GEMM rescales by), and calibrates a static
per-tensor input scale for each on the calibration data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mgtq.files import atomic_file
from mgtq.models.transformer import MeissonicTransformer
from mgtq.modules import set_submodule
from mgtq.quantization import FakeQuantLinear, input_scales_from_stats
from mgtq.sampling import SamplerConfig
from mgtq.scq.magnitudes import calibration_inputs, device_of, record_activation_stats
from mgtq.scq.qat import use_per_channel_weights_
from mgtq.scq.recipe import MagnitudeConfig, SecondaryConfig
from mgtq.scq.synthesis import CalibrationData
from mgtq.training.objective import masked_distillation_loss


def measure_a8_sensitivity(model: torch.nn.Module, names: list[str], data: CalibrationData, cfg: SecondaryConfig,
                           magnitude_cfg: MagnitudeConfig, sampler: SamplerConfig, progress: bool = True,
                           desc: str = "sensitivity") -> dict[str, float]:
    """{layer: the damage of putting it alone on A8}: the mean KL of the model's masked-token
    predictions, with that one layer on its A8 form (per-channel int4 weights, int8 inputs at a
    calibrated scale), against the all-A16 fake-quant `model`, on the first `cfg.sensitivity_samples`
    calibration images at the magnitudes' mask ratios. `model` is left as it was."""
    limit = cfg.sensitivity_samples if magnitude_cfg.max_samples is None else min(cfg.sensitivity_samples,
                                                                                  magnitude_cfg.max_samples)
    sub = dataclasses.replace(magnitude_cfg, max_samples=limit)
    stats = record_activation_stats(model, data, sub, sampler, names, progress=False)
    scales = input_scales_from_stats(stats, cfg.scale_method, cfg.percentile)
    a16 = {name: model.get_submodule(name) for name in names}
    if not all(isinstance(layer, FakeQuantLinear) for layer in a16.values()):
        raise TypeError("sensitivity is measured on a fake-quant model (mgtq.scq.qat.prepare_fake_quant_)")
    a8 = {name: FakeQuantLinear.from_linear(layer, None, scales[name]) for name, layer in a16.items()}
    total = dict.fromkeys(names, 0.0)
    batches = 0
    with torch.inference_mode():
        # Batch-major, so only one batch of reference logits is held at a time.
        for inputs, mask in calibration_inputs(data, sub, sampler, model.mask_token_id, progress, desc,
                                               device_of(model)):
            reference = model(**inputs)
            for name in names:
                set_submodule(model, name, a8[name])
                try:
                    total[name] += float(masked_distillation_loss(model(**inputs), reference, mask))
                finally:
                    set_submodule(model, name, a16[name])
            batches += 1
    return {name: total[name] / batches for name in names}


def calibrate_input_scales_(model: MeissonicTransformer, a8: list[str], data: CalibrationData, cfg: SecondaryConfig,
                            magnitude_cfg: MagnitudeConfig, sampler: SamplerConfig, progress: bool = True,
                            desc: str = "secondary") -> dict[str, float]:
    """Activation-scale calibration of SCQ's A8 layers: switch them to per-channel weights in fake-quant
    `model` (so the calibration sees the exported weights), calibrate and set their static int8 input
    scales; returns {layer: scale}."""
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
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
