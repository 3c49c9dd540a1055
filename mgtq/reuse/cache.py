"""Context reuse on the model side: the keys/values of one image's last full step, and the token plans
of full and local steps (ReCAP, arXiv 2505.19089 §3: full evaluations interleaved with local ones that
recompute only a group of tokens and attend to the cached features of the context).

    cache = ContextCache()
    logits = model(..., token_hook=cache.full_step())          # every token; records each block's K/V
    logits = model(..., token_hook=cache.local_step(active))   # only the active tokens, against them

A full step is the model's ordinary forward (bit for bit) that also keeps, per block, the keys and
values attention read: [text; image] after RoPE. A local step computes the active image tokens only:
no text stream, no other image token; in each block it writes the active tokens' fresh keys/values
into the recorded ones, in place, and attends to all of them. So every other token, text included,
is context with the features of the last full step, and a local step costs about M·(L + N) in
attention and M rows in every Linear, for M active of N tokens. The cache lives for one sampling call.

Feature compression (Meissonic-1024): the transformer grid is the VQ grid ÷ f (f = 2). The 2×2 down
conv (stride 2) makes transformer token (r, c) from VQ tokens (f·r + i, f·c + j), i, j < f, and the
transposed up conv and the 1×1-conv head give back exactly those f×f logits from that one token;
nothing else mixes tokens outside attention. So a transformer token is active when any of its f×f VQ
tokens is (`active_tokens`), and its f×f logits are all exact.

Batches: every sample keeps its own active set; the plan pads each to the largest count in the batch,
rounded up to a multiple of `bucket` (so compiled blocks see few distinct lengths), by repeating the
sample's first active token: a repeat computes the same values as the token it repeats and writes the
same keys/values, so padding changes nothing. A CFG forward (batch [uncond; cond] of the same tokens)
uses the sampler's active set for both halves.
"""

from __future__ import annotations

import math

import torch

from mgtq.models.hooks import BlockTokens, Rope, TokenPlan


def active_tokens(active: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Active VQ tokens (B, H, W) bool → active transformer tokens (B, h·w) bool on the h×w grid:
    a token is active when any of the f×f VQ tokens it covers is (f = H / h, 2 with feature compression)."""
    batch, height, width = active.shape
    h, w = grid
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"an active mask of {height}×{width} VQ tokens does not tile the {h}×{w} transformer grid")
    f = height // h
    return active.reshape(batch, h, f, w, f).any(dim=4).any(dim=2).reshape(batch, h * w)


def padded_indices(active: torch.Tensor, bucket: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Active tokens (B, N) bool → (their indices (B, M), ascending, each row padded to M (the largest
    count, rounded up to a multiple of `bucket`, at most N) by repeating its first index (0 if none);
    valid (B, M) bool: which slots hold a distinct active token)."""
    batch, n = active.shape
    counts = active.sum(1)
    m = min(n, max(1, math.ceil(int(counts.max()) / bucket) * bucket))
    # Active tokens sort first (stable: ascending index), then the others; cut at M and pad.
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :m]
    slot = torch.arange(m, device=active.device).expand(batch, m)
    valid = slot < counts[:, None]
    return torch.where(valid, order, order[:, :1]), valid


class ContextCache:
    """Per-block keys/values of the last full step of one sampling call (see the module docstring)."""

    def __init__(self, bucket: int = 1):
        self.bucket = int(bucket)
        self.keys_values: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.batch: int | None = None
        self.n_text: int | None = None
        self.grid: tuple[int, int] | None = None
        self.computed = 1.0  # fraction of the image tokens the latest forward computed (batch mean)

    def full_step(self) -> "_FullStep":
        """The token hook of a full step: the ordinary forward, recording every block's keys/values."""
        return _FullStep(self)

    def local_step(self, active: torch.Tensor) -> "_LocalStep":
        """The token hook of a local step; active (B, H, W) bool on the VQ grid: the tokens to recompute."""
        if not self.keys_values:
            raise RuntimeError("a local step needs the keys/values of a full step first; run cache.full_step() before")
        return _LocalStep(self, active)


class _FullStep:
    def __init__(self, cache: ContextCache):
        self.cache = cache

    def bind(self, grid: tuple[int, int], masked: torch.Tensor | None = None) -> TokenPlan:
        return _Recording(self.cache, grid)


class _Recording(TokenPlan):
    def __init__(self, cache: ContextCache, grid: tuple[int, int]):
        self.cache, self.grid = cache, grid

    def enter(self, x, context, rope):
        self.cache.keys_values.clear()
        self.cache.batch, self.cache.n_text, self.cache.grid = x.shape[0], context.shape[1], self.grid
        self.cache.computed = 1.0
        return x, context, rope

    def plan(self, kind, index, x):
        return _Record(self.cache.keys_values, (kind, index)), None


class _Record(BlockTokens):
    def __init__(self, store: dict, key: tuple[str, int]):
        self.store, self.key = store, key

    def keys_values(self, k, v):
        self.store[self.key] = (k.contiguous(), v.contiguous())  # written into in place by local steps
        return k, v


class _LocalStep:
    def __init__(self, cache: ContextCache, active: torch.Tensor):
        if active.dim() != 3 or active.dtype != torch.bool:
            raise ValueError(f"active must be a (B, H, W) bool mask of VQ tokens; got {tuple(active.shape)} {active.dtype}")
        self.cache, self.active = cache, active

    def bind(self, grid: tuple[int, int], masked: torch.Tensor | None = None) -> TokenPlan:
        cache = self.cache
        if tuple(grid) != cache.grid:
            raise ValueError(f"local step on a {grid[0]}×{grid[1]} grid, but the cached full step ran on "
                             f"{cache.grid[0]}×{cache.grid[1]}")
        batch = masked.shape[0] if masked is not None else cache.batch
        if batch != cache.batch or batch % self.active.shape[0]:
            raise ValueError(
                f"local step of batch {batch} with an active mask of batch {self.active.shape[0]}, but the cached "
                f"full step had batch {cache.batch}: a local step must run the same batch (and CFG halves) as "
                "the full step it reuses"
            )
        active = self.active.to(masked.device if masked is not None else self.active.device)
        active = active.repeat(batch // active.shape[0], 1, 1)  # CFG: [uncond; cond] share the tokens
        index, valid = padded_indices(active_tokens(active, grid), cache.bucket)
        cache.computed = float(valid.sum(1).float().mean()) / (grid[0] * grid[1])
        return _Local(cache, index, valid, grid)


class _Local(TokenPlan):
    computes_subset = True

    def __init__(self, cache: ContextCache, index: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]):
        self.cache, self.index, self.valid, self.grid = cache, index, valid, grid
        self.rows = cache.n_text + index  # (B, M): the active tokens' rows of the [text; image] sequence

    def enter(self, x, context, rope: Rope):
        index, rows = self.index.to(x.device), self.rows.to(x.device)
        x = x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))  # (B, M, D)
        return x, None, (rope[0][rows], rope[1][rows])  # (L + N, Dh) tables → (B, M, Dh) rows

    def plan(self, kind, index, x):
        return _Splice(self.cache.keys_values[(kind, index)], self.rows), None

    def leave(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, M, V, f, f) logits of the active tokens → (B, V, H, W); tokens not computed get 0."""
        batch, m, vocab, f, _ = logits.shape
        h, w = self.grid
        out = logits.new_zeros(batch, h * w, vocab, f, f)
        rows, slots = self.valid.to(logits.device).nonzero(as_tuple=True)  # padding slots are not placed
        out[rows, self.index.to(logits.device)[rows, slots]] = logits[rows, slots]
        return out.reshape(batch, h, w, vocab, f, f).permute(0, 3, 1, 4, 2, 5).reshape(batch, vocab, h * f, w * f)


class _Splice(BlockTokens):
    """Writes the active tokens' fresh keys/values into the cached [text; image] ones; attention reads all."""

    def __init__(self, cached: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor):
        self.cached, self.rows = cached, rows

    def keys_values(self, k, v):
        cached_k, cached_v = self.cached
        where = self.rows.to(k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        cached_k.scatter_(2, where, k.to(cached_k.dtype))
        cached_v.scatter_(2, where, v.to(cached_v.dtype))
        return cached_k, cached_v
