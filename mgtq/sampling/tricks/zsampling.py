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
inversion confidence is the plain log-probability (no Gumbel). In editing, the candidates are the
decoded *editable* tokens: a fixed (context) token is never re-masked.

remask (masked variant only): "paper" (default) re-masks the lowest-confidence tokens as above;
"official" follows the official demo's rule: the k decoded tokens whose max-probability
max_v p_inv(v) under the inversion pass is HIGHEST. Only the ranking rule is the demo's; the
rest of the step (e.g. the demo also mixes new samples in) stays mgtq's.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from mgtq.sampling.tokens import remask_lowest, uniform_scores

ZSamplingVariant = Literal["off", "masked", "random", "recover"]
Remask = Literal["paper", "official"]
ZSAMPLING_VARIANTS = get_args(ZSamplingVariant)
REMASK_RULES = get_args(Remask)


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


def remask_scores(logits: torch.Tensor, tokens: torch.Tensor, decoded: torch.Tensor, rule: str) -> torch.Tensor:
    """Scores (B, N) whose lowest k decoded positions are re-masked; +inf at masked positions.

    "paper": log p_inv(x_j) of the decoded token; "official": −max_v p_inv(v), i.e. the most
    confident positions go first. logits (B, N, V) are the inversion pass's.
    """
    if rule == "paper":
        return token_confidence(logits, tokens, decoded)
    if rule == "official":
        peak = logits.float().softmax(-1).amax(-1)
        return torch.where(decoded, -peak, torch.full_like(peak, float("inf")))
    raise ValueError(f"unknown Z-sampling remask rule {rule!r}; choose one of {REMASK_RULES}")


def invert_by_remasking(
    before: torch.Tensor,
    after: torch.Tensor,
    mask_id: int,
    variant: str,
    generators: list[torch.Generator],
    inversion_logits: torch.Tensor | None = None,
    remask: str = "paper",
    editable: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_{i+1} → z̃_i: tokens (B, N) with as many masks as `before` (z_i) had.

    inversion_logits (B, N, V): the inversion-CFG pass on `after`, needed by "masked" only;
    remask: its ranking rule, "paper" or "official"; editable (B, N) bool: the positions that may be
    re-masked (None: all; editing passes the positions that are not fixed).
    """
    if variant == "recover":
        return before.clone()
    decoded = after != mask_id
    if editable is not None:
        decoded = decoded & editable
    k = (before == mask_id).sum(-1) - (after == mask_id).sum(-1)
    if variant == "masked":
        if inversion_logits is None:
            raise ValueError("masked Z-sampling needs the inversion pass's logits")
        scores = remask_scores(inversion_logits, after, decoded, remask)
    elif variant == "random":
        scores = uniform_scores(tuple(after.shape[1:]), generators, after.device)
        scores = torch.where(decoded, scores, torch.full_like(scores, float("inf")))
    else:
        raise ValueError(f"unknown Z-sampling variant {variant!r}; choose one of {ZSAMPLING_VARIANTS[1:]}")
    # masked (and fixed) positions score +inf, so only decoded editable tokens are re-masked;
    # the already-masked stay so
    remask = remask_lowest(scores, k) | (after == mask_id)
    return torch.where(remask, torch.full_like(after, mask_id), after)
