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
