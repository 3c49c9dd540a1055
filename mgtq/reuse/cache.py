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

Selective K/V refresh (MARché, arXiv 2506.12035: "selective KV refresh identifies contextually relevant
tokens based on attention scores from newly generated tokens and updates only those"): with
`refresh` r > 0, each local step also recomputes ⌈r · decoded⌉ decoded image tokens of the context (at
the transformer grid: all f×f VQ ids decoded, not active), those that the previous local step's
active tokens attended to most, so their cached keys/values are rewritten from the current input.
Their logits are not read: the sampler decodes only its group. The scores come from ONE block, the
last joint (MMDiT) block (the last single-stream block if there is none): past the first blocks,
whose attention is dominated by RoPE position, and the deepest point where the image keys come from
the image stream's own projections, so the scores rank image tokens against each other. That choice
is mgtq's, not measured against others. SDPA does not return attention weights, so that block's
active queries are scored once more against the keys attention read, softmax(q·kᵀ/√Dh): M × (L + N)
per head, summed over the active queries (padding and refreshed slots excluded) and averaged over
heads. A full step clears the scores (its cache is fresh), so the first local step after it refreshes
nothing. What mgtq follows: MARché's rule as its abstract states it (refresh only the cached tokens the
new tokens attend to most). Where it differs, or chooses what the abstract leaves open: the scores are
those of every token a local step computes for the sampler (its group, and the tokens the full step
decoded), not of the newly decoded ones alone; they are taken in one block, not per layer; and the
refresh is sized as a fraction of the decoded tokens, applied at the next local step.

With TomeMGT (`full_step().around(plan)`, as the pipeline composes them): a full step merges as
TomeMGT says and records, per block, each image token's keys/values as its merged token's (the
merged row repeated once per member; with proportional attention, which TomeMGT uses by default,
attending to the repeats equals attending to the merged token with its log-size bias). A local step
merges nothing: its few scattered active tokens have no 2×2 cells to merge, and it writes their fresh
rows per token.

Batches: every sample keeps its own active set; the plan pads each to the largest count in the batch,
rounded up to a multiple of `bucket` (so compiled blocks see few distinct lengths), by repeating the
sample's first active token: a repeat computes the same values as the token it repeats and writes the
same keys/values, so padding changes nothing. A sample with no active token (others in its batch have
some) computes token 0 at the local step and writes its keys/values over the full step's: that sample's
outputs are not read until the next full step, which rebuilds the cache. A CFG forward (batch [uncond; cond] of the same tokens)
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

    def __init__(self, bucket: int = 1, refresh: float = 0.0):
        if not 0 <= refresh <= 1:
            raise ValueError(f"refresh must be a fraction in [0, 1] of the decoded tokens (0 = off), got {refresh}")
        self.bucket, self.refresh = int(bucket), float(refresh)
        # (kind, block index) → [keys, values], filled by the block during a full step. One list per block
        # that its block tokens write into, rather than the dict and the key: a compiled block would be
        # specialised to the key's value (one graph per block instead of one per kind of block).
        self.keys_values: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.batch: int | None = None
        self.n_text: int | None = None
        self.grid: tuple[int, int] | None = None
        self.computed = 1.0  # fraction of the image tokens the latest forward computed (batch mean)
        # K/V refresh: (B, N) attention mass each image token got from the latest local step's active queries
        # in the scored block (None after a full step), and the tokens the latest local step refreshed.
        self.attention: torch.Tensor | None = None
        self.refreshed: torch.Tensor | None = None

    def full_step(self) -> "_FullStep":
        """The token hook of a full step: the ordinary forward, recording every block's keys/values."""
        return _FullStep(self, None)

    def local_step(self, active: torch.Tensor) -> "_LocalStep":
        """The token hook of a local step; active (B, H, W) bool on the VQ grid: the tokens to recompute."""
        if not self.keys_values or not all(self.keys_values.values()):
            raise RuntimeError("a local step needs the keys/values of a full step first; run cache.full_step() before")
        return _LocalStep(self, active)

    @property
    def scored_block(self) -> tuple[str, int]:
        """The block whose attention scores the refresh: the last joint block (the last single one if none)."""
        joint = [key for key in self.keys_values if key[0] == "joint"]
        return max(joint or self.keys_values, key=lambda key: key[1])

    def to_refresh(self, active: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: the context tokens a local step refreshes; active / decoded (B, N) bool at the grid."""
        if not self.refresh or self.attention is None:
            return torch.zeros_like(active)
        count = torch.ceil(self.refresh * decoded.sum(1)).long()
        return most_attended(self.attention.to(active.device), decoded & ~active, count)


def most_attended(scores: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the count[b] candidates of highest score (B, N) per sample (ties: lower index first)."""
    ranked = scores.float().masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(ranked.shape[1], device=ranked.device)
                                             .expand_as(ranked))
    return (rank < count[:, None]) & candidates


class _FullStep:
    def __init__(self, cache: ContextCache, inner):
        self.cache, self.inner = cache, inner

    def around(self, hook) -> "_FullStep":
        """This full step run with another technique's token hook inside (TomeMGT; None = alone)."""
        if getattr(getattr(hook, "config", None), "proportional_attention", True) is False:
            # The recorded repeats of a merged row weigh it by its size in every local step: what proportional
            # attention does; without it the full step weighs it once, and the two steps would disagree.
            raise ValueError("context reuse runs TomeMGT with proportional attention only (each merged token's "
                             "cached row repeats once per member); set TomeConfig(proportional_attention=True) "
                             "or turn context reuse off (reuse.interval 1)")
        return _FullStep(self.cache, hook)

    def bind(self, grid: tuple[int, int], masked: torch.Tensor | None = None) -> TokenPlan:
        inner = None if self.inner is None else self.inner.bind(grid, masked)
        if inner is not None and inner.computes_subset:
            raise ValueError("a full step of context reuse computes every token; the token hook it runs around "
                             f"({type(self.inner).__name__}) computes a subset")
        return _Recording(self.cache, grid, inner)


class _Recording(TokenPlan):
    def __init__(self, cache: ContextCache, grid: tuple[int, int], inner: TokenPlan | None = None):
        self.cache, self.grid = cache, grid
        self.inner = inner if inner is not None else TokenPlan()  # the defaults change nothing

    def enter(self, x, context, rope):
        x, context, rope = self.inner.enter(x, context, rope)
        self.cache.keys_values.clear()
        self.cache.batch, self.cache.n_text, self.cache.grid = x.shape[0], context.shape[1], self.grid
        self.cache.computed = 1.0
        self.cache.attention = self.cache.refreshed = None  # every cached key/value is fresh now
        return x, context, rope

    def plan(self, kind, index, x):
        attention, mlp = self.inner.plan(kind, index, x)
        slot = self.cache.keys_values[(kind, index)] = []
        return _Record(slot, self.cache.n_text, attention), mlp


class _Record(BlockTokens):
    """Records the keys/values attention reads, one row per image token (see `_per_token`); with an inner
    technique's block tokens (TomeMGT's merge), the block computes as that technique says."""

    precompilable = True  # with an inner technique's block tokens, only if those are too

    def __init__(self, slot: list, n_text: int, inner: BlockTokens | None = None):
        self.slot, self.n_text, self.merging = slot, n_text, inner is not None
        self.inner = inner if inner is not None else _Unchanged()

    def reduce(self, x):
        return self.inner.reduce(x)

    def restore(self, y):
        return self.inner.restore(y)

    def rope(self, rope, n_text, batch):
        return self.inner.rope(rope, n_text, batch)

    def key_bias(self, n_text):
        return self.inner.key_bias(n_text)

    def keys_values(self, k, v):
        k, v = self.inner.keys_values(k, v)
        self.slot[:] = (self._per_token(k), self._per_token(v))  # written into in place by local steps
        return k, v

    def attention_inputs(self, q, k):
        self.inner.attention_inputs(q, k)

    def _per_token(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, L + M, Dh) → (B, H, L + N, Dh): under merging, each image token gets its merged token's row.

        Attention over a merged token's row repeated once per member is proportional attention (the
        log-size key bias TomeMGT adds), so a local step attending to these rows sees the context the
        merged full step computed, and writes its fresh rows per token."""
        if not self.merging:
            return t.contiguous()
        batch, heads, _, dh = t.shape
        image = t[:, :, self.n_text:].transpose(1, 2).flatten(2)  # (B, M, H·Dh)
        image = self.inner.restore(image).unflatten(2, (heads, dh)).transpose(1, 2)  # (B, H, N, Dh)
        return torch.cat([t[:, :, :self.n_text], image], dim=2)


class _Unchanged(BlockTokens):
    """The defaults (nothing changes), declared precompilable: a full step's block tokens when it runs alone."""

    precompilable = True


class _LocalStep:
    def __init__(self, cache: ContextCache, active: torch.Tensor):
        if active.dim() != 3 or active.dtype != torch.bool:
            raise ValueError(f"active must be a (B, H, W) bool mask of VQ tokens; got {tuple(active.shape)} {active.dtype}")
        self.cache, self.active = cache, active

    def around(self, hook) -> "_LocalStep":
        """A local step runs no other technique's hook: its few scattered active tokens have no 2×2 cells
        for TomeMGT to merge, so it computes them all."""
        return self

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
        active = active_tokens(active.repeat(batch // active.shape[0], 1, 1), grid)  # CFG: both halves share them
        refreshed = torch.zeros_like(active)
        if masked is not None:  # decoded at the grid: none of the f×f ids is [MASK] (the input no longer changes)
            refreshed = cache.to_refresh(active, ~active_tokens(masked.to(active.device), grid))
        index, valid = padded_indices(active | refreshed, cache.bucket)
        cache.computed = float(valid.sum(1).float().mean()) / (grid[0] * grid[1])
        cache.refreshed = refreshed
        queries = None
        if cache.refresh:  # the scored block fills cache.attention in place (compiled blocks too: no new attribute)
            queries = active.gather(1, index) & valid  # the slots whose attention scores: active, not padding
            cache.attention = torch.zeros(active.shape, dtype=torch.float32, device=active.device)
        return _Local(cache, index, valid, grid, queries)


class _Local(TokenPlan):
    computes_subset = True

    def __init__(self, cache: ContextCache, index: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int],
                 queries: torch.Tensor | None = None):
        self.cache, self.index, self.valid, self.grid, self.queries = cache, index, valid, grid, queries
        self.tokens = index  # the model embeds only these (B, M)
        self.rows = cache.n_text + index  # (B, M): the computed tokens' rows of the [text; image] sequence
        self.scored = None if queries is None else cache.scored_block

    def enter(self, x, context, rope: Rope):
        rows = self.rows.to(x.device)
        return x, None, (rope[0][rows], rope[1][rows])  # x: the tokens' (B, M, D); (L + N, Dh) tables → (B, M, Dh)

    def plan(self, kind, index, x):
        if (kind, index) == self.scored:
            return _ScoredSplice(self.cache.keys_values[(kind, index)], self.rows, self.queries, self.cache.attention,
                                 self.cache.n_text), None
        return _Splice(self.cache.keys_values[(kind, index)], self.rows), None

    def leave(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, M, V, f, f) logits of the active tokens → (B, V, H, W); tokens not computed get 0.

        The result is laid out as the full forward's head output is (channels last: (B, H, W, V) in
        memory), so the sampler's (B, N, V) rows are contiguous. In NCHW, building it cost a transposing
        copy of every logit here and made the sampler's softmax and finite check read across rows
        (about a second per local step at 64×64 × 8192).
        """
        batch, m, vocab, f, _ = logits.shape
        h, w = self.grid
        out = logits.new_zeros(batch, h, f, w, f, vocab)
        rows, slots = self.valid.to(logits.device).nonzero(as_tuple=True)  # padding slots are not placed
        token = self.index.to(logits.device)[rows, slots]
        # (n, V, f, f) → (n, f, f, V): the f×f logits of transformer token (r, c) are VQ rows f·r + i, cols f·c + j
        out[rows, token // w, :, token % w] = logits[rows, slots].permute(0, 2, 3, 1)
        return out.permute(0, 5, 1, 2, 3, 4).reshape(batch, vocab, h * f, w * f)  # a view: no copy


class _Splice(BlockTokens):
    """Writes the active tokens' fresh keys/values into the cached [text; image] ones; attention reads all."""

    precompilable = varying_tokens = True  # one compiled block serves every local step's token count

    def __init__(self, cached: list[torch.Tensor], rows: torch.Tensor):
        self.cached, self.rows = cached, rows

    def keys_values(self, k, v):
        cached_k, cached_v = self.cached
        rows = self.rows.to(k.device)
        batch = torch.arange(rows.shape[0], device=rows.device)[:, None]
        # Indexed assignment over (B, S) rows of the (B, S, H, Dh) view writes whole H·Dh rows, where scatter_
        # with a broadcast (B, H, M, Dh) index writes element by element (many times slower at Meissonic-1024).
        cached_k.transpose(1, 2)[batch, rows] = k.transpose(1, 2).to(cached_k.dtype)
        cached_v.transpose(1, 2)[batch, rows] = v.transpose(1, 2).to(cached_v.dtype)
        return cached_k, cached_v


class _ScoredSplice(_Splice):
    """_Splice that also scores the context for the next local step's refresh (see the module docstring)."""

    def __init__(self, cached, rows: torch.Tensor, queries: torch.Tensor, scores: torch.Tensor, n_text: int):
        super().__init__(cached, rows)
        self.queries, self.scores, self.n_text = queries, scores, n_text

    def attention_inputs(self, q, k):
        """q (B, H, M, Dh) of the computed slots, k (B, H, L + N, Dh) → the scores (B, N), written in place."""
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        weight = self.queries.to(probs.device, probs.dtype) / q.shape[1]  # active slots only; mean over heads
        self.scores.copy_(torch.einsum("bhms,bm->bs", probs, weight)[:, self.n_text:])
