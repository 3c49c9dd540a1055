"""Token-level primitives shared by the sampler and its tricks: Gumbel noise, per-sample
multinomial sampling, and "pick the k lowest" ranking.

Every random draw takes the per-sample generators, so a sample's result never depends on what
else is in its batch.
"""

from __future__ import annotations

import torch


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Standard Gumbel noise −log(−log u), u ~ U(0, 1) clamped away from 0 as in the official code."""
    u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def sample_tokens(probs: torch.Tensor, generators: list[torch.Generator],
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ ~ p per token: probs (B, N, V) → ids (B, N), one generator per sample.

    rows (B, N) bool: draw only these tokens (the others get id 0, for a caller that does not read
    them); each sample's generator then draws for its rows alone, in index order. A local step of
    context reuse decodes only its group: drawing for every token made the sampler cost as much as
    the model at Meissonic-1024 (multinomial's exponential draw over 4096 × 8192 per sample).
    """
    out = []
    for b, gen in enumerate(generators):
        p = probs[b] if rows is None else probs[b][rows[b]]
        ids = torch.multinomial(p.float().to(gen.device), 1, generator=gen)[:, 0].to(probs.device)
        if rows is not None:
            ids = torch.zeros(probs.shape[1], dtype=ids.dtype, device=probs.device).masked_scatter_(rows[b], ids)
        out.append(ids)
    return torch.stack(out)


def remask_lowest(confidence: torch.Tensor, n_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, N): the n_mask[b] lowest-confidence positions of each row (ties broken by index)."""
    order = confidence.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks < n_mask[:, None]


def uniform_scores(shape: tuple[int, ...], generators: list[torch.Generator], device) -> torch.Tensor:
    """U(0, 1) scores (B, *shape) drawn row by row from the per-sample generators."""
    return torch.stack([torch.rand(shape, generator=g, device=g.device).to(device) for g in generators])


def standard_normal(shape: tuple[int, ...], generators: list[torch.Generator], device) -> torch.Tensor:
    """N(0, I) noise (B, *shape) drawn row by row from the per-sample generators."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device).to(device) for g in generators])
