"""TomeMGT's matching: bipartite soft matching of image tokens with one destination per 2×2 cell.

Paper: "Bag of Design Choices for Inference of High-Resolution Masked Generative Transformer"
(arXiv 2411.10781) §4.2 / App. 9.5, after ToMe for Stable Diffusion. Pure functions: no state, no
global RNG; randomness only through a `torch.Generator` passed in.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

MergeFn = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def cell_destinations(grid: tuple[int, int], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices (N_dst,) ascending of one destination token per 2×2 cell of an h×w grid.

    With a generator, each cell's destination is one of its four tokens drawn uniformly (on the
    generator's device, so a seed gives the same pattern on any compute device); without, the
    top-left token. Rows/columns left over by an odd side belong to no cell: they are sources.
    """
    h, w = grid
    ch, cw = h // 2, w // 2
    if generator is None:
        offset = torch.zeros(ch, cw, dtype=torch.long)
    else:
        offset = torch.randint(4, (ch, cw), generator=generator, device=generator.device).cpu()
    rows = 2 * torch.arange(ch)[:, None] + offset // 2
    cols = 2 * torch.arange(cw)[None, :] + offset % 2
    return (rows * w + cols).flatten().sort().values.to(device)


def bipartite_soft_matching_2x2(
    metric: torch.Tensor, grid: tuple[int, int], r: int, destinations: torch.Tensor | None = None
) -> tuple[MergeFn, MergeFn]:
    """Merge the r image tokens most similar to a 2×2-cell destination into it; unmerge by copy.

    Paper §4.2 (ToMe-SD matching): j*(i) = argmax_j cos(m_i, m_j); merge the r sources of largest cos.
    Destinations j are one token per 2×2 cell, sources i all the others; a merged token becomes
    the mean of its destination and the sources merged into it.

    metric (B, N, C): the tokens to compare (the block input), N = h·w on `grid` (h, w), row-major.
    r: number of tokens to remove per sample, capped at the number of sources (r ≤ 3N/4).
    destinations (N_dst,): flat destination indices shared by the batch (default: `cell_destinations`
    top-left); the matching itself is per sample, so any batch size works and a sample's result
    does not depend on what else is in its batch.

    Returns (merge, unmerge): merge (B, N, C') → (B, N − r, C') for any tensor on the same tokens
    (hidden states, per-sample RoPE tables), keeping surviving tokens in their original order;
    unmerge (B, N − r, C') → (B, N, C'), every merged source receiving its destination's row.
    A plain (unweighted) mean is exact here because the matching is recomputed from unmerged
    tokens: every merged token is the mean of its original members, RoPE tables included.
    """
    batch, n, _ = metric.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"metric has {n} tokens but the grid {grid[0]}×{grid[1]} has {grid[0] * grid[1]}")
    device = metric.device
    dst_idx = cell_destinations(grid, device=device) if destinations is None else destinations.to(device)
    is_src = torch.ones(n, dtype=torch.bool, device=device)
    is_src[dst_idx] = False
    src_idx = is_src.nonzero().squeeze(1)  # (N_src,)
    r = min(int(r), src_idx.numel())
    if r <= 0:
        return identity, identity

    with torch.no_grad():
        # float32 for the ranking: bf16 cosines tie often and would make the choice arbitrary
        a = F.normalize(metric[:, src_idx].float(), dim=-1)
        b = F.normalize(metric[:, dst_idx].float(), dim=-1)
        scores = a @ b.transpose(1, 2)  # (B, N_src, N_dst)
        best, best_dst = scores.max(dim=-1)  # (B, N_src)
        order = best.argsort(dim=-1, descending=True, stable=True)
        merged = order[:, :r]  # positions in src_idx of the r merged sources, (B, r)
        merged_tok = src_idx[merged]  # (B, r) token indices
        into_tok = dst_idx[best_dst.gather(1, merged)]  # (B, r) their destinations' token indices

        keep = torch.ones(batch, n, dtype=torch.bool, device=device)
        keep.scatter_(1, merged_tok, False)
        kept_tok = keep.nonzero()[:, 1].view(batch, n - r)  # (B, N − r) ascending: original order
        # slot (B, N): where each original token lives in the merged sequence
        slot = torch.empty(batch, n, dtype=torch.long, device=device)
        slot.scatter_(1, kept_tok, torch.arange(n - r, device=device).expand(batch, -1))
        into_slot = slot.gather(1, into_tok)  # (B, r)
        slot.scatter_(1, merged_tok, into_slot)
        counts = torch.ones(batch, n - r, device=device).scatter_add_(1, into_slot, torch.ones(batch, r, device=device))

        # Row indices into the flattened (B·N, C) / (B·(N − r), C) tensors: index_select and
        # index_put_ move whole rows, several times faster on CPU than gather/scatter with expanded
        # indices. index_put_(accumulate) rather than index_add_/scatter_add_: on CPU those two stall
        # for ~0.1 s with 2 threads when a neighbour holds a core; index_put_ is serial and steady.
        kept_rows = _flat(kept_tok, n)
        merged_rows = _flat(merged_tok, n)
        into_rows = _flat(into_slot, n - r)
        slot_rows = _flat(slot, n - r)
        counts = counts.reshape(-1, 1)

    def merge(x: torch.Tensor) -> torch.Tensor:  # (B, N, C) → (B, N − r, C)
        rows = x.reshape(batch * n, x.shape[-1])
        out = rows.index_select(0, kept_rows)
        out.index_put_((into_rows,), rows.index_select(0, merged_rows), accumulate=True)
        return (out / counts.to(out.dtype)).view(batch, n - r, -1)  # ÷1 keeps unmerged rows bit-exact

    def unmerge(y: torch.Tensor) -> torch.Tensor:  # (B, N − r, C) → (B, N, C)
        return y.reshape(batch * (n - r), y.shape[-1]).index_select(0, slot_rows).view(batch, n, -1)

    return merge, unmerge


def _flat(index: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K) per-sample indices into sequences of `length` → (B·K,) row indices of the flattened batch."""
    return (index + length * torch.arange(index.shape[0], device=index.device)[:, None]).flatten()
