"""SCQ step 3 (paper §4.1): each Linear layer's input-activation magnitude under the QAT model.

The calibration tokens are masked at each of the recipe's mask ratios (the sampler's timesteps) and
fed as the sampler feeds them ([uncond, cond] batch); per layer, a statistic of |x| is recorded.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from mgtq.models.transformer import MeissonicTransformer
from mgtq.quantization import calibrate_activations
from mgtq.sampling import SamplerConfig
from mgtq.sampling.schedules import timestep_for_mask_ratio
from mgtq.scq.recipe import MagnitudeConfig
from mgtq.scq.synthesis import CalibrationData


def calibration_batches(n_samples: int, grid_size: int, cfg: MagnitudeConfig, seed: int = 0):
    """(sample indices, mask (b, h·w) bool, masked fraction) over the calibration set × mask ratios."""
    n = n_samples if cfg.max_samples is None else min(cfg.max_samples, n_samples)
    gen = torch.Generator().manual_seed(seed)
    for ratio in cfg.mask_ratios:
        k = max(1, round(ratio * grid_size))
        for start in range(0, n, cfg.batch_size):
            idx = torch.arange(start, min(n, start + cfg.batch_size))
            ranks = torch.rand(len(idx), grid_size, generator=gen).argsort(1).argsort(1)
            yield idx, ranks < k, k / grid_size


def calibration_inputs(data: CalibrationData, cfg: MagnitudeConfig, sampler: SamplerConfig, mask_token_id: int,
                       progress: bool = True, desc: str = "calibration", device: torch.device | str = "cpu"):
    """The calibration inputs as the sampler feeds them ([uncond, cond] batch), on `device`: yields (the model's
    keyword arguments, mask (2b, h, w) of the masked positions) per batch."""
    grid = data.tokens[0].numel()
    batches = list(calibration_batches(data.tokens.shape[0], grid, cfg))
    for idx, mask, frac in tqdm(batches, desc=desc, disable=not progress):
        tokens = data.tokens[idx]
        inp = torch.where(mask.view_as(tokens), torch.full_like(tokens, mask_token_id), tokens)
        b = len(idx)
        t = timestep_for_mask_ratio(sampler.convention, frac, sampler.num_steps, sampler.schedule,
                                    sampler.rho)
        text = torch.cat([data.uncond_text.expand(b, -1, -1), data.text[idx]])
        pooled = torch.cat([data.uncond_pooled.expand(b, -1), data.pooled[idx]])
        inputs = dict(hidden_states=torch.cat([inp, inp]), encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=torch.full((2 * b,), float(t)), micro_conds=data.micro_conds.expand(2 * b, 5))
        yield ({k: v.to(device) for k, v in inputs.items()},
               torch.cat([mask, mask]).view(2 * b, *tokens.shape[1:]).to(device))


def device_of(model: torch.nn.Module) -> torch.device:
    """Where `model`'s weights are (its first parameter's device)."""
    return next(model.parameters()).device


def record_activation_stats(model: MeissonicTransformer, data: CalibrationData, cfg: MagnitudeConfig,
                            sampler: SamplerConfig, names: list[str], progress: bool = True,
                            desc: str = "calibration"):
    """Run the calibration inputs through `model` as the sampler would ([uncond, cond] batch) and
    record the input statistics of the Linear layers `names`: {name: ActivationStats}."""
    with calibrate_activations(model, names) as stats, torch.inference_mode():
        for inputs, _ in calibration_inputs(data, cfg, sampler, model.mask_token_id, progress, desc,
                                            device_of(model)):
            model(**inputs)
    return stats


def magnitude_of(stats, statistic: str, percentile: float) -> float:
    if statistic == "mean_abs":
        return stats.mean_abs
    if statistic == "absmax":
        return stats.absmax
    return stats.percentile(percentile)


def measure_magnitudes(model: MeissonicTransformer, data: CalibrationData, cfg: MagnitudeConfig,
                       sampler: SamplerConfig, names: list[str], progress: bool = True,
                       desc: str = "magnitudes") -> tuple[dict[str, float], dict[str, dict]]:
    """({layer: the recipe's statistic}, {layer: every statistic}) over data × timesteps."""
    stats = record_activation_stats(model, data, cfg, sampler, names, progress, desc=desc)
    unreached = [n for n in names if stats[n].count == 0]
    if unreached:
        raise ValueError(f"calibration never reached the Linear(s) {unreached[:3]}{' …' if len(unreached) > 3 else ''} "
                         "(no input passed through them): their activation magnitudes cannot be measured; add them "
                         "to qat.skip in the recipe")
    table = {n: {"mean_abs": s.mean_abs, "absmax": s.absmax, f"p{cfg.percentile:g}": s.percentile(cfg.percentile)}
             for n, s in stats.items()}
    chosen = {n: magnitude_of(stats[n], cfg.statistic, cfg.percentile) for n in names}
    bad = [n for n, v in chosen.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite activations at {bad[:3]}; the QAT weights are unusable — lower qat.lr")
    return chosen, table
