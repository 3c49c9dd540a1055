"""One block's token merging, as the model's token hook sees it (mgtq.models.hooks.BlockTokens).

The block merges its image tokens and their RoPE tables before a sub-layer and unmerges the outputs
after it; with member counts, attention is proportional (ToMe, arXiv 2210.09461 §3: log(size) added to
a merged token's key logits, so a token standing for s identical tokens gets the weight those s had).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mgtq.models.hooks import BlockTokens, Rope


@dataclass
class TokenMerge(BlockTokens):
    """Merge/unmerge callables for one block's image tokens (see mgtq.merging.tome).

    merge: (B, N, C) → (B, N - r, C); unmerge: (B, N - r, C) → (B, N, C).
    sizes (B, N - r): how many original tokens each merged token stands for; None = plain attention.
    """

    merge: Callable[[torch.Tensor], torch.Tensor]
    unmerge: Callable[[torch.Tensor], torch.Tensor]
    sizes: torch.Tensor | None = None

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(x)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        return self.unmerge(y)

    def rope(self, rope: Rope, n_text: int, batch: int) -> Rope:
        return merge_rope(rope, n_text, self, batch)

    def key_bias(self, n_text: int) -> torch.Tensor | None:
        """Additive attention-logit bias (B, 1, 1, L + N - r) for [text; merged image] keys, or None."""
        if self.sizes is None:
            return None
        log_sizes = self.sizes.log()
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
        merged.append(torch.cat([table[:, :n_text], merge.merge(table[:, n_text:])], dim=1))
    return merged[0], merged[1]
