"""TomeMGT's matching: local bipartite soft matching of image tokens, one destination per 2×2 cell.

Paper: "Bag of Design Choices for Inference of High-Resolution Masked Generative Transformer"
(arXiv 2411.10781) §4.2 / App. 9.5, after ToMe for Stable Diffusion, with one change for MGTs:
a source may only merge into a destination inside its window (its own 2×2 cell by default), and
ties go to the nearest destination. At the first sampling steps almost every image token is the
same [MASK] embedding, so global matching sees cosine 1 everywhere and piles sources from across
the image into one destination. Pure functions: no state, no global RNG; randomness only through
a `torch.Generator` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F

from mgtq.merging.token_merge import TokenMerge

MergeFn = Callable[[torch.Tensor], torch.Tensor]
Locality = Literal["cell", "window", "global"]  # where a source may merge (match_2x2)
LOCALITIES = get_args(Locality)
# Cosines this close to a source's best count as ties (float32 rounding of identical rows).
TIE_TOLERANCE = 1e-6


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def cell_destinations(grid: tuple[int, int], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices (N_dst,) ascending of one destination token per 2×2 cell of an h×w grid.

    With a generator, each cell's destination is one of its four tokens drawn uniformly (on the
    generator's device, so a seed gives the same pattern on any compute device); without, the
    top-left token. A row/column left over by an odd side joins the last cell before it (see
    `cell_of`), as a source.
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


def cell_of(index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cell number (row-major over the ⌊h/2⌋×⌊w/2⌋ cells) of flat token indices; odd leftovers join the last cell."""
    h, w = grid
    ch, cw = h // 2, w // 2
    rows = (index // w // 2).clamp(max=ch - 1)
    cols = (index % w // 2).clamp(max=cw - 1)
    return rows * cw + cols


def match_2x2(
    metric: torch.Tensor,
    grid: tuple[int, int],
    r: int | Sequence[int],
    destinations: torch.Tensor | None = None,
    locality: str = "cell",
    window: int = 3,
    eligible: torch.Tensor | None = None,
    preferred: torch.Tensor | None = None,
) -> TokenMerge | None:
    """Merge the r image tokens most similar to a destination in their window into it; unmerge by copy.

    Paper §4.2 (ToMe-SD matching): j*(i) = argmax_{j ∈ W(i)} cos(m_i, m_j); merge the r sources of
    largest cos. Destinations j are one token per 2×2 cell, sources i all the others; a merged token
    becomes the mean of its destination and the sources merged into it.

    metric (B, N, C): the tokens to compare (the block input), N = h·w on `grid` (h, w), row-major.
    r: number of tokens to remove, one for every sample or one per sample, each capped at the number of that
    sample's sources that may merge.
    destinations (N_dst,): flat destination indices shared by the batch (default: `cell_destinations`
    top-left). locality: W(i) = the destination of i's own cell ("cell": one score per source, no
    N_src × N_dst product), those within the window×window square centred on i and its own cell's
    ("window", window odd; the own cell matters only for odd leftover rows/columns), or all ("global", ToMe-SD
    and the paper). Ties (cosines within TIE_TOLERANCE of the best) go to i's own cell's destination, then the
    nearest, then the lowest index.
    eligible (B, N) bool: tokens that may be sources (default all).
    preferred (B, N) bool: sources merged before all others (then by cos), e.g. decoded tokens.
    The matching is per sample, and so is the count: where samples merge different counts r_b, the merged
    sequences all have N − min r_b rows, a sample that merges more ending in padding rows (size 0) that
    attention ignores (`TokenMerge.key_bias`) and `restore` never reads. A sample's result does not depend
    on its batch-mates.

    Returns the matching as a `TokenMerge` (None when nothing merges): its `reduce` (B, N, C') → (B, N − r, C')
    for any tensor on the same tokens (hidden states, per-sample RoPE tables), keeping surviving tokens in
    their original order; `restore` (B, N − r, C') → (B, N, C'); `sizes` each merged token's member count.
    A plain (unweighted) mean is exact here because the matching is recomputed from unmerged
    tokens: every merged token is the mean of its original members, RoPE tables included.
    """
    batch, n, _ = metric.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"metric has {n} tokens but the grid {grid[0]}×{grid[1]} has {grid[0] * grid[1]}")
    if locality not in LOCALITIES:
        raise ValueError(f"locality must be one of {LOCALITIES}; got {locality!r}")
    device = metric.device
    dst_idx = cell_destinations(grid, device=device) if destinations is None else destinations.to(device)
    wanted = [int(r)] * batch if isinstance(r, (int, float)) else [int(v) for v in r]
    if len(wanted) != batch:
        raise ValueError(f"r gives {len(wanted)} counts for a batch of {batch}; give one, or one per sample")
    if dst_idx.numel() == 0 or max(wanted) <= 0:
        return None
    is_dst = torch.zeros(n, dtype=torch.int8, device=device)
    is_dst[dst_idx] = 1
    # (N_src,) ascending; a stable sort rather than nonzero(): its size is known, so a GPU need not wait for it
    src_idx = is_dst.argsort(stable=True)[: n - dst_idx.numel()]

    with torch.no_grad():
        # float32 for the ranking: bf16 cosines tie often and would make the choice arbitrary
        a = F.normalize(metric[:, src_idx].float(), dim=-1)  # (B, N_src, C)
        if locality == "cell":
            best, best_dst = _match_cell(a, metric, grid, src_idx, dst_idx)
        else:
            b = F.normalize(metric[:, dst_idx].float(), dim=-1)  # (B, N_dst, C)
            best, best_dst = _match_windowed(a, b, grid, src_idx, dst_idx, locality, window)
        if eligible is not None:
            best = best.masked_fill(~eligible.to(device)[:, src_idx], float("-inf"))
        if eligible is not None or locality != "cell":  # only these leave sources with no destination (-inf)
            free = (best > float("-inf")).sum(1).tolist()  # a host sync: r sets shapes
        else:  # every source has its own cell's destination: no sync
            free = [src_idx.numel()] * batch
        counts = [min(w, f) for w, f in zip(wanted, free)]
        if preferred is not None:  # cos ≤ 1, so +3 ranks every preferred source first
            best = best + 3.0 * preferred.to(device)[:, src_idx]
        r, length = max(counts), n - min(counts)  # the most any sample merges; the merged sequences' length
        if r <= 0:
            return None
        order = best.argsort(dim=-1, descending=True, stable=True)
        merged = order[:, :r]  # positions in src_idx of the merged sources, (B, r): the first r_b of row b merge
        merged_tok = src_idx[merged]  # (B, r) token indices
        into_tok = dst_idx[best_dst.gather(1, merged)]  # (B, r) their destinations' token indices
        uneven = min(counts) != r
        taken = (torch.arange(r, device=device) < torch.tensor(counts, device=device)[:, None]) if uneven else None

        keep = torch.ones(batch, n, dtype=torch.bool, device=device)
        keep.scatter_(1, merged_tok, False if taken is None else ~taken)
        # (B, length): the kept tokens in original order; where a sample merged more, its merged sources follow
        # as padding rows (sized 0 below)
        kept_tok = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :length]
        # slot (B, N): where each original token lives in the merged sequence
        slot = torch.empty(batch, n, dtype=torch.long, device=device)
        slot.scatter_(1, kept_tok, torch.arange(length, device=device).expand(batch, -1))
        into_slot = slot.gather(1, into_tok)  # (B, r)
        if taken is not None:  # a source row b does not merge stays in its own slot and adds nothing
            into_slot = torch.where(taken, into_slot, slot.gather(1, merged_tok))
        slot.scatter_(1, merged_tok, into_slot)
        weight = torch.ones(batch, r, device=device) if taken is None else taken.float()
        sizes = torch.ones(batch, length, device=device).scatter_add_(1, into_slot, weight)
        if taken is not None:  # row b's slots from N − r_b on are padding
            pad = torch.arange(length, device=device) >= (n - torch.tensor(counts, device=device))[:, None]
            sizes = sizes.masked_fill(pad, 0.0)
        return TokenMerge(_flat(kept_tok, n), _flat(merged_tok, n), _flat(into_slot, length), _flat(slot, length),
                          sizes, weights=None if taken is None else taken.flatten().float())


def bipartite_soft_matching_2x2(
    metric: torch.Tensor,
    grid: tuple[int, int],
    r: int | Sequence[int],
    destinations: torch.Tensor | None = None,
    locality: str = "cell",
    window: int = 3,
    eligible: torch.Tensor | None = None,
    preferred: torch.Tensor | None = None,
    return_sizes: bool = False,
) -> tuple[MergeFn, MergeFn] | tuple[MergeFn, MergeFn, torch.Tensor | None]:
    """`match_2x2` as ToMe's pair of functions: (merge, unmerge), identities when nothing merges; with
    `return_sizes`, also each merged-sequence token's member count (B, N − r) float32 (None when nothing merges)."""
    matching = match_2x2(metric, grid, r, destinations, locality, window, eligible, preferred)
    merge, unmerge, sizes = (identity, identity, None) if matching is None else (
        matching.reduce, matching.restore, matching.sizes)
    return (merge, unmerge, sizes) if return_sizes else (merge, unmerge)


def _match_cell(a, metric, grid, src_idx, dst_idx):
    """Each source against its own cell's destination only: (best (B, N_src), best_dst (B, N_src))."""
    dst_of_cell = torch.empty_like(dst_idx)
    dst_of_cell[cell_of(dst_idx, grid)] = torch.arange(dst_idx.numel(), device=dst_idx.device)
    own = dst_of_cell[cell_of(src_idx, grid)]  # (N_src,) position in dst_idx
    b = F.normalize(metric[:, dst_idx[own]].float(), dim=-1)  # (B, N_src, C): one row per source
    best = (a * b).sum(-1)
    return best, own.expand(a.shape[0], -1)


def _match_windowed(a, b, grid, src_idx, dst_idx, locality, window):
    """Sources against every destination in their window (all for "global"), ties to the nearest."""
    w = grid[1]
    dr = (src_idx // w)[:, None] - (dst_idx // w)[None, :]
    dc = (src_idx % w)[:, None] - (dst_idx % w)[None, :]
    other_cell = cell_of(src_idx, grid)[:, None] != cell_of(dst_idx, grid)[None, :]
    # Tie-break rank (N_src, N_dst): own cell first, then squared distance, then destination order.
    n_dst = dst_idx.numel()
    rank = (other_cell.long() * (dr.square().max() + dc.square().max() + 1) + dr.square() + dc.square()) * n_dst
    rank = rank + torch.arange(n_dst, device=rank.device)
    scores = a @ b.transpose(1, 2)  # (B, N_src, N_dst)
    if locality == "window":
        outside = ((dr.abs() > window // 2) | (dc.abs() > window // 2)) & other_cell  # own cell always in
        scores = scores.masked_fill(outside, float("-inf"))
    best = scores.max(dim=-1).values  # (B, N_src)
    tied = scores >= (best - TIE_TOLERANCE)[..., None]
    best_dst = torch.where(tied, rank, rank.max() + 1).argmin(dim=-1)
    return best, best_dst


def _flat(index: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K) per-sample indices into sequences of `length` → (B·K,) row indices of the flattened batch."""
    return (index + length * torch.arange(index.shape[0], device=index.device)[:, None]).flatten()
