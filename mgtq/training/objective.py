"""The masked-token objective of MGT training — shared by training from scratch and by SCQ's QAT.

MaskGIT/Meissonic training: draw r ~ U(0, 1), mask a random cos(πr/2) fraction of the image tokens
(at least one), predict the masked tokens with cross-entropy. The transformer's `timestep` is the
fraction of masked input tokens: mgtq's "mask_ratio" convention, which the sampler then feeds at
inference (mgtq.sampling.schedules.timestep_value), so training, QAT and sampling agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mask_tokens(tokens: torch.Tensor, mask_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomly mask a cosine-distributed fraction of each sample's tokens.

    tokens (B, H, W) → (masked input (B, H, W), mask (B, H, W) bool, timestep (B,) = masked fraction).
    """
    b = tokens.shape[0]
    n = tokens[0].numel()
    r = torch.rand(b, generator=generator, device=generator.device).to(tokens.device)
    n_mask = torch.ceil(torch.cos(r * math.pi / 2) * n).clamp(1, n).long()  # (B,)
    scores = torch.rand(b, n, generator=generator, device=generator.device).to(tokens.device)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a random permutation per sample
    mask = (ranks < n_mask[:, None]).view_as(tokens)
    masked = torch.where(mask, torch.full_like(tokens, mask_id), tokens)
    return masked, mask, n_mask.float() / n


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked positions: logits (B, V, H, W), targets/mask (B, H, W)."""
    logits = logits.permute(0, 2, 3, 1)[mask]  # (M, V)
    return F.cross_entropy(logits.float(), targets[mask])


def masked_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over masked positions: logits (B, V, H, W), mask (B, H, W).

    The knowledge-distillation form of the masked-token objective: the student matches the teacher's
    whole predicted distribution at every position it must predict, not one sampled token.
    """
    student = F.log_softmax(student_logits.permute(0, 2, 3, 1)[mask].float(), dim=-1)  # (M, V)
    teacher = F.log_softmax(teacher_logits.permute(0, 2, 3, 1)[mask].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")
