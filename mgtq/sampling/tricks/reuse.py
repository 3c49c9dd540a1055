"""Which tokens the local steps after a full step compute (ReCAP arXiv 2505.19089 §3.2, grouped decoding).

At a full step the sampler knows, for every token it leaves masked, its confidence log p(x̂) + τ·Gumbel
(the rule that chose what to re-mask). ReCAP decodes the tokens of the next local steps from one group
fixed at the full evaluation; mgtq fills that group by the same confidence rule and Gumbel schedule as
the plain sampler, with the schedule's own counts, so a run with local steps decodes as many tokens per
step as one without. Where mgtq differs from ReCAP: the tokens the full step itself decoded are
recomputed too (their input changed from [MASK] to an id after the cache was built).
"""

from __future__ import annotations

import torch

from mgtq.sampling.tokens import remask_lowest


def decoded_until(num_to_mask, step: int, until: int, num_tokens, masked: torch.Tensor) -> torch.Tensor:
    """How many tokens (B,) the schedule decodes in steps step+1 … until−1, from masked (B,) after `step`.

    num_to_mask(step, num_tokens, num_masked) → the schedule's masked count after that step (B,).
    """
    left = masked
    for later in range(step + 1, until):
        left = num_to_mask(later, num_tokens, left)
    return masked - left


def most_confident(confidence: torch.Tensor, candidates: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the size[b] candidates of highest confidence (B, N) per sample (ties: lower index first)."""
    score = torch.where(candidates, -confidence.float(), torch.full_like(confidence, float("inf"), dtype=torch.float))
    return remask_lowest(score, size) & candidates


def most_confident_cells(confidence: torch.Tensor, candidates: torch.Tensor, size: torch.Tensor,
                         grid: tuple[int, int], cell: int = 2) -> torch.Tensor:
    """(B, N) bool: the size[b] candidates taken cell by cell: the cell×cell blocks of the h×w grid ranked by
    their most confident candidate (ties: lower cell first), and within a cell by confidence.

    With Meissonic's feature compression a 2×2 cell is one transformer token, so a group of whole cells
    makes local steps compute up to 4× fewer transformer tokens than the same number of scattered ones.
    """
    batch, n = confidence.shape
    h, w = grid
    if h % cell or w % cell:
        raise ValueError(f"group 'cells' needs a token grid divisible by {cell}, got {h}×{w}; use group 'confidence'")
    score = torch.where(candidates, confidence.float(), torch.full_like(confidence, float("-inf"), dtype=torch.float))
    blocks = (batch, h // cell, cell, w // cell, cell)
    best = score.view(blocks).amax(dim=(2, 4), keepdim=True).expand(blocks).reshape(batch, n)
    cell_id = torch.arange((h // cell) * (w // cell), device=score.device).view(1, h // cell, 1, w // cell, 1)
    cell_id = cell_id.expand(blocks).reshape(batch, n)
    order = score.argsort(dim=1, descending=True, stable=True)
    keys = ((cell_id, False), (best, True), (candidates.to(torch.int8), True))  # stable sorts: the last ranks first
    for key, descending in keys:
        order = order.gather(1, key.gather(1, order).argsort(dim=1, descending=descending, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(batch, n))
    return (rank < size[:, None]) & candidates
