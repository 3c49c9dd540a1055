"""QAT trains a copy: the pipeline's transformer it is handed is left exactly as it was; gradient checkpointing
changes its memory, not its result."""

import copy

import pytest
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


def test_the_evaluation_in_chunks_is_the_one_batch_mean(random_pipeline):
    from mgtq.scq.qat import eval_chunk, fixed_eval_metrics, prepare_fake_quant_, qat_terms

    teacher = copy.deepcopy(random_pipeline.transformer).float().eval()
    student = copy.deepcopy(teacher)
    prepare_fake_quant_(student, QATConfig())
    data, sampler = _data(teacher, samples=6), random_pipeline.settings.sampler
    gen = torch.Generator().manual_seed(1234)  # the single batch the evaluation was before it had chunks
    idx = torch.randint(0, 6, (10,), generator=gen)
    with torch.no_grad():
        one_batch = {k: float(v) for k, v in qat_terms(student, data, idx, torch.zeros(10, dtype=torch.bool), gen,
                                                       sampler, "cpu", ("ce", "kl_to_float"), teacher).items()}
    assert fixed_eval_metrics(student, data, sampler, "cpu", n=10, teacher=teacher) == one_batch  # one chunk: as was
    for chunk in (1, 3, 4):
        chunked = fixed_eval_metrics(student, data, sampler, "cpu", n=10, teacher=teacher, chunk=chunk)
        assert chunked.keys() == one_batch.keys() and one_batch["kl_to_float"] > 0
        assert all(abs(chunked[k] - one_batch[k]) <= 1e-5 * abs(one_batch[k]) for k in one_batch), (chunk, chunked)
    assert eval_chunk(8192 * 64 * 64) == 4  # meissonic-1024: 4 of the 64 samples a forward
    assert eval_chunk(264 * 8 * 8) >= 64 and eval_chunk(1 << 30) == 1  # tiny-shapes: all 64 in one


def test_a_failure_in_the_closing_evaluation_resumes_to_it_without_training_again(tmp_path, random_pipeline,
                                                                                   monkeypatch):
    import weakref

    from mgtq.scq import qat

    transformer = random_pipeline.transformer
    data, sampler = _data(transformer), random_pipeline.settings.sampler
    cfg = QATConfig(steps=3, lr=1e-2, batch_size=2, save_every=2)
    optimizers, evaluate, trained, evaluations = [], qat.fixed_eval_metrics, [], []

    class AdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(weakref.ref(self))

    def out_of_memory_at_the_end(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 2:  # the closing evaluation
            import gc

            gc.collect()
            assert [ref() for ref in optimizers] == [None]  # the optimizer's state was freed before it
            raise RuntimeError("CUDA out of memory")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(qat, "fixed_eval_metrics", out_of_memory_at_the_end)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_qat(transformer, data, cfg, sampler, tmp_path / "state", "fp", progress=False)
    monkeypatch.setattr(qat, "fixed_eval_metrics", evaluate)
    loss = qat.qat_loss
    monkeypatch.setattr(qat, "qat_loss", lambda *a, **k: trained.append(1) or loss(*a, **k))
    resumed = train_qat(transformer, data, cfg, sampler, tmp_path / "state", "fp", progress=False)
    assert trained == []  # the state after the last step was saved before the evaluation
    reference = train_qat(transformer, data, cfg, sampler, tmp_path / "reference", "fp", progress=False)
    assert resumed.summary == reference.summary
    assert all(torch.equal(resumed.weights[k], reference.weights[k]) for k in reference.weights)


def test_adamw_is_fused_on_cuda_only(tmp_path, random_pipeline, monkeypatch):
    from mgtq.scq import qat

    assert qat.adamw_options("cuda") == {"fused": True}  # no full-size foreach temporary at each step
    assert qat.adamw_options("cpu") == {}  # torch's default: CPU results as before
    asked = []
    monkeypatch.setattr(qat, "adamw_options", lambda device_type: asked.append(device_type) or {})
    transformer = random_pipeline.transformer
    train_qat(transformer, _data(transformer), QATConfig(steps=1, batch_size=2), random_pipeline.settings.sampler,
              tmp_path / "state", "fp", progress=False)
    assert asked == ["cpu"]  # chosen for the device accelerate trains on
