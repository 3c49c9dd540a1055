"""mgtq.training.objective: token masking, the masked-token loss and the masked distillation loss."""

import math

import torch

from mgtq.training.objective import mask_tokens, masked_token_loss


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


def test_mask_tokens_fraction_and_timestep():
    tokens = torch.randint(0, 10, (64, 4, 4))
    masked, mask, timestep = mask_tokens(tokens, 99, torch.Generator().manual_seed(0))
    assert torch.equal(mask.flatten(1).sum(1).float() / 16, timestep)
    assert (mask.flatten(1).sum(1) >= 1).all()
    assert torch.equal(masked[~mask], tokens[~mask]) and (masked[mask] == 99).all()
    # cosine-distributed ratio: mean of cos(πr/2) over U(0,1) is 2/π
    many = mask_tokens(torch.zeros(4000, 8, 8, dtype=torch.long), 1, torch.Generator().manual_seed(1))[2]
    assert abs(many.mean().item() - 2 / math.pi) < 0.03


def test_masked_token_loss_ignores_unmasked_positions():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 10.0  # confidently predicts class 1 everywhere
    targets = torch.tensor([[[1, 0], [0, 0]]])
    mask = torch.tensor([[[True, False], [False, False]]])
    assert masked_token_loss(logits, targets, mask).item() < 1e-3
