"""Masked Z-sampling (arXiv 2411.10781 §3.4): at step i, step i → i+1, invert back to i by
re-masking tokens, then step i → i+1 again. The inversion is where the semantics come in:

- "masked":  re-mask the k decoded tokens of z_{i+1} with the lowest confidence log p_inv(x_j),
             p_inv from one extra model pass on z_{i+1} with the inversion CFG scale (default 0,
             i.e. the unconditional prediction). NFE 3 per Z-step.
- "random":  re-mask k decoded tokens chosen uniformly at random (paper's "vanilla" ablation). NFE 2.
- "recover": re-mask exactly the k tokens the forward step decoded, i.e. go back to z_i
             (paper's "recover" ablation: reuse the first mask). NFE 2.

k = #masked(z_i) − #masked(z_{i+1}), per sample, so the inversion lands on step i's mask count.
Interpretation: the candidates are all decoded tokens of z_{i+1} (earlier steps' included) —
restricting them to the k tokens just decoded would make "masked" identical to "recover". The
inversion confidence is the plain log-probability (no Gumbel). The official demo ranks by the
highest max-probability and mixes in new samples; mgtq follows the paper's "low confidence".
"""

from __future__ import annotations

import torch

from mgtq.sampling.tokens import remask_lowest, uniform_scores

ZSAMPLING_VARIANTS = ("off", "masked", "random", "recover")


def z_step_applies(variant: str, steps: tuple[int, ...] | None, step: int, num_steps: int) -> bool:
    """Whether step `step` is a Z-step; steps=None means every step but the last (as the paper's demo)."""
    if variant == "off":
        return False
    return step < num_steps - 1 if steps is None else step in steps


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """log p(x_j) of each decoded token under logits (B, N, V) → (B, N); +inf at masked positions."""
    ids = torch.where(decoded, tokens, torch.zeros_like(tokens))  # the mask id may lie outside V
    logp = logits.float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    return torch.where(decoded, logp, torch.full_like(logp, float("inf")))


def invert_by_remasking(
    before: torch.Tensor,
    after: torch.Tensor,
    mask_id: int,
    variant: str,
    generators: list[torch.Generator],
    inversion_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_{i+1} → z̃_i: tokens (B, N) with as many masks as `before` (z_i) had.

    inversion_logits (B, N, V): the inversion-CFG pass on `after`, needed by "masked" only.
    """
    if variant == "recover":
        return before.clone()
    decoded = after != mask_id
    k = (before == mask_id).sum(-1) - (after == mask_id).sum(-1)
    if variant == "masked":
        if inversion_logits is None:
            raise ValueError("masked Z-sampling needs the inversion pass's logits")
        scores = token_confidence(inversion_logits, after, decoded)
    elif variant == "random":
        scores = uniform_scores(tuple(after.shape[1:]), generators, after.device)
        scores = torch.where(decoded, scores, torch.full_like(scores, float("inf")))
    else:
        raise ValueError(f"unknown Z-sampling variant {variant!r}; choose one of {ZSAMPLING_VARIANTS[1:]}")
    # masked positions score +inf, so only decoded tokens are re-masked (and already-masked stay so)
    remask = remask_lowest(scores, k) | ~decoded
    return torch.where(remask, torch.full_like(after, mask_id), after)
