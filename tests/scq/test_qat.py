"""QAT trains a copy: the pipeline's transformer it is handed is left exactly as it was; gradient checkpointing
changes its memory, not its result."""

import copy

import torch

from mgtq.scq.qat import train_qat
from mgtq.scq.recipe import QATConfig
from mgtq.scq.synthesis import CalibrationData


def _data(transformer, samples: int = 4) -> CalibrationData:
    g = torch.Generator().manual_seed(0)
    return CalibrationData(tokens=torch.randint(0, transformer.config.codebook_size, (samples, 16, 16), generator=g),
                           text=torch.randn(samples, 16, 32, generator=g), pooled=torch.randn(samples, 32, generator=g),
                           uncond_text=torch.zeros(1, 16, 32), uncond_pooled=torch.zeros(1, 32),
                           micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]]))


def test_train_qat_leaves_the_model_it_is_handed_unchanged(tmp_path, random_pipeline):
    transformer = random_pipeline.transformer
    before = copy.deepcopy(transformer.state_dict())
    kinds = [type(m) for m in transformer.modules()]
    data = _data(transformer)
    cfg = QATConfig(steps=2, lr=1e-2, batch_size=2, objective="ce+distill")
    result = train_qat(transformer, data, cfg, random_pipeline.settings.sampler, tmp_path / "state", "fp", progress=False)
    assert [type(m) for m in transformer.modules()] == kinds
    after = transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not transformer.training
    assert set(result.weights) == set(before)
    assert any(not torch.equal(result.weights[k], before[k]) for k in before)  # the copy did train
    assert result.summary["loss_before"].keys() == {"ce", "kl_to_float"}


def test_gradient_checkpointing_trains_through_the_blocks_checkpointed_to_the_same_weights(tmp_path, random_pipeline,
                                                                                             monkeypatch):
    transformer = random_pipeline.transformer
    data, sampler = _data(transformer), random_pipeline.settings.sampler
    cfg = QATConfig(steps=2, lr=1e-2, batch_size=2, gradient_accumulation=2)
    plain = train_qat(transformer, data, cfg, sampler, tmp_path / "plain", "fp", progress=False)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(function, *args, **kwargs):
        calls.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    cfg = QATConfig(steps=2, lr=1e-2, batch_size=2, gradient_accumulation=2, gradient_checkpointing=True)
    checkpointed = train_qat(transformer, data, cfg, sampler, tmp_path / "ckpt", "fp", progress=False)
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert len(calls) == 2 * 2 * blocks  # every block of every training forward; none in the no-grad evaluations
    assert not transformer.gradient_checkpointing  # the copy trained so, not the model handed in
    assert checkpointed.summary == plain.summary
    assert all(torch.equal(checkpointed.weights[k], plain.weights[k]) for k in plain.weights)
