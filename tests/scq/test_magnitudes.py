"""mgtq.scq.magnitudes: a layer calibration never reaches is named, not measured as zero."""

import copy

import pytest
import torch

from mgtq.scq.magnitudes import measure_magnitudes
from mgtq.scq.recipe import MagnitudeConfig
from mgtq.scq.synthesis import CalibrationData


def test_a_linear_calibration_never_reaches_is_named_with_what_to_do(random_pipeline):
    model = copy.deepcopy(random_pipeline.transformer).eval()
    model.unused = torch.nn.Linear(8, 8)  # held by the model, called by nothing
    g = torch.Generator().manual_seed(0)
    data = CalibrationData(tokens=torch.randint(0, model.config.codebook_size, (2, 16, 16), generator=g),
                           text=torch.randn(2, 16, 32, generator=g), pooled=torch.randn(2, 32, generator=g),
                           uncond_text=torch.zeros(1, 16, 32), uncond_pooled=torch.zeros(1, 32),
                           micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]]))
    cfg = MagnitudeConfig(mask_ratios=(0.5,), batch_size=2)
    sampler = random_pipeline.settings.sampler
    chosen, _ = measure_magnitudes(model, data, cfg, sampler, ["context_embedder"], progress=False)
    assert chosen["context_embedder"] > 0
    with pytest.raises(ValueError, match=r"never reached the Linear\(s\) \['unused'\].*add them to qat.skip"):
        measure_magnitudes(model, data, cfg, sampler, ["context_embedder", "unused"], progress=False)
