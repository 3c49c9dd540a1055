"""mgtq.training.objective: the masked distillation loss."""

import torch


def test_masked_distillation_loss_is_zero_only_for_the_teacher():
    from mgtq.training.objective import masked_distillation_loss

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 7, 3, 3, generator=g)
    mask = torch.rand(2, 3, 3, generator=g) < 0.5
    assert masked_distillation_loss(teacher, teacher, mask).abs() < 1e-6
    student = teacher.clone()
    student[~mask.unsqueeze(1).expand_as(student)] += 5  # unmasked positions do not count
    assert masked_distillation_loss(student, teacher, mask).abs() < 1e-6
    student[mask.unsqueeze(1).expand_as(student)] *= 2
    assert masked_distillation_loss(student, teacher, mask) > 1e-3
