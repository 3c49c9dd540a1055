"""One block's token merging, as the model's token hook sees it (mgtq.models.hooks.BlockTokens).

The block merges its image tokens and their RoPE tables before a sub-layer and unmerges the outputs
after it; with member counts, attention is proportional (ToMe, arXiv 2210.09461 §3: log(size) added to
a merged token's key logits, so a token standing for s identical tokens gets the weight those s had).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mgtq.models.hooks import BlockTokens, Rope


@dataclass(eq=False)
class TokenMerge(BlockTokens):
    """One block's matching (see mgtq.merging.tome.match_2x2) as row indices over the flattened batch.

    With N image tokens per sample and r merged: kept_rows (B·(N − r),) the rows of (B·N, C) that stay, in
    their order; merged_rows (B·r,) the rows merged away and into_rows (B·r,) the rows of (B·(N − r), C) they
    are added into; slot_rows (B·N,) where each original row lives in the merged sequence; sizes (B, N − r)
    float32 how many original tokens each merged token stands for. proportional: attention with log-size key
    bias; off: plain attention. weights (B·r,) float or None: where samples merge different counts, 1 for the
    merged_rows that merge and 0 for the rest (they stay in their own row); the merged sequence then has padding
    rows of size 0, which attention never attends to and `restore` never reads.

    Plain tensors, not closures, so a block called with it can be compiled ahead of time and saved
    (mgtq.compilation); r changes with the sampler step, hence `varying_tokens`.
    """

    precompilable = varying_tokens = True

    kept_rows: torch.Tensor
    merged_rows: torch.Tensor
    into_rows: torch.Tensor
    slot_rows: torch.Tensor
    sizes: torch.Tensor
    proportional: bool = True
    weights: torch.Tensor | None = None

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, N − r, C): each merged token the mean of its members, survivors in their order."""
        # Sizes come from the tensors, not from ints r, n and batch: under torch.compile an int that changes
        # between calls (r does, with the masked count) becomes a symbol of unknown sign, and views sized by it
        # give strides like (n − r)·C·(…)/(r − n) whose sign Inductor's range analysis fails on ("Exponent must
        # be non-negative"); sizes of tensors are known to be positive. index_select / index_put_ move whole rows
        # rather than gathering element by element through expanded indices, and index_put_(accumulate) runs
        # serially, so its cost does not depend on how many threads are free.
        rows = x.flatten(0, 1)
        out = rows.index_select(0, self.kept_rows)
        sources = rows.index_select(0, self.merged_rows)
        if self.weights is not None:
            sources = sources * self.weights[:, None].to(sources.dtype)
        out.index_put_((self.into_rows,), sources, accumulate=True)
        counts = self.sizes.reshape(-1, 1).to(out.dtype)
        if self.weights is not None:
            counts = counts.clamp(min=1)  # padding rows (size 0) keep what they hold
        return (out / counts).unflatten(0, (x.shape[0], -1))  # ÷1 keeps unmerged rows bit-exact

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N − r, C) → (B, N, C): every merged source receives its destination's row."""
        return y.flatten(0, 1).index_select(0, self.slot_rows).unflatten(0, (y.shape[0], -1))

    def rope(self, rope: Rope, n_text: int, batch: int) -> Rope:
        return merge_rope(rope, n_text, self, batch)

    def key_bias(self, n_text: int) -> torch.Tensor | None:
        """Additive attention-logit bias (B, 1, 1, L + N - r) for [text; merged image] keys, or None: log-sizes
        (proportional attention), and −inf for padding rows (size 0) either way."""
        if not self.proportional and self.weights is None:
            return None
        log_sizes = self.sizes.log() if self.proportional else torch.zeros_like(self.sizes).masked_fill(
            self.sizes == 0, float("-inf"))
        text = log_sizes.new_zeros(log_sizes.shape[0], n_text)
        return torch.cat([text, log_sizes], dim=1)[:, None, None, :]


def merge_rope(rope: Rope, n_text: int, merge: TokenMerge, batch: int) -> Rope:
    """RoPE of merged tokens = mean of the members' cos/sin (paper App. 9.5); text rows kept.

    (L + N, Dh) or per-sample (B, L + N, Dh) tables → per-sample (B, L + N - r, Dh) tables, since each
    sample merges differently.
    """
    merged = []
    for table in rope:
        table = table.expand(batch, *table.shape[-2:])
        merged.append(torch.cat([table[:, :n_text], merge.reduce(table[:, n_text:])], dim=1))
    return merged[0], merged[1]
