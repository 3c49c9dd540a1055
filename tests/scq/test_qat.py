"""QAT trains a copy: the pipeline's transformer it is handed is left exactly as it was."""

import copy

import torch

from mgtq.scq.qat import train_qat
from mgtq.scq.recipe import QATConfig
from mgtq.scq.synthesis import CalibrationData


def test_train_qat_leaves_the_model_it_is_handed_unchanged(tmp_path, random_pipeline):
    transformer = random_pipeline.transformer
    before = copy.deepcopy(transformer.state_dict())
    kinds = [type(m) for m in transformer.modules()]
    g = torch.Generator().manual_seed(0)
    data = CalibrationData(tokens=torch.randint(0, transformer.config.codebook_size, (4, 16, 16), generator=g),
                           text=torch.randn(4, 16, 32, generator=g), pooled=torch.randn(4, 32, generator=g),
                           uncond_text=torch.zeros(1, 16, 32), uncond_pooled=torch.zeros(1, 32),
                           micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]]))
    cfg = QATConfig(steps=2, lr=1e-2, batch_size=2, objective="ce+distill")
    result = train_qat(transformer, data, cfg, random_pipeline.settings.sampler, tmp_path / "state", "fp", progress=False)
    assert [type(m) for m in transformer.modules()] == kinds
    after = transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not transformer.training
    assert set(result.weights) == set(before)
    assert any(not torch.equal(result.weights[k], before[k]) for k in before)  # the copy did train
    assert result.summary["loss_before"].keys() == {"ce", "kl_to_float"}
