"""Start states of the sampler for zero-shot editing (Meissonic §3.2): sampling from a given grid.

An MGT predicts any subset of tokens given the rest, so editing needs no training, only a different
start than the all-mask grid of text-to-image:

- inpainting: the tokens to repaint start as [MASK]; every other token is *fixed*: context that is
  never re-masked or resampled, not even by masked Z-sampling's inversion. The schedule counts the
  repainted tokens only, as if they were the whole image (N = #repainted in n = ⌊N·σ⌋), and the
  "mask_ratio" timestep is their masked fraction (1 at the start), as the "step_index" one follows
  the schedule: the official inpainting feeds the step index, whatever share of the image is given.
- img2img (mask-free editing): `strength` is diffusers' and the official pipelines': the last
  int(T·strength) steps of the schedule run, from step i = T − int(T·strength), and the image's tokens
  start re-masked in the count text-to-image holds masked when it enters step i (⌊N·σ(i/T)⌋; with the
  cosine schedule, 71 % at strength 0.5). The positions are chosen uniformly at random without
  replacement from each sample's own generator. Nothing is fixed: the kept tokens are what the earlier
  steps would have decoded. The official img2img (`src/pipeline_img2img.py`, `Scheduler.add_noise`) masks
  each token with probability σ(i/T) from `torch.rand` (diffusers' aMUSEd σ((i+1)/T)); mgtq masks that
  exact count, so a start is (up to a few tokens, `num_remasked`) one a text-to-image run passes through,
  and at strength 1 everything (the official code's σ(1) masks nothing there).
- inpainting takes a `strength` too, as aMUSEd's and the official inpainting do: the repainted tokens
  all start masked, and only the last int(T·strength) steps run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mgtq.config import plain_scalar
from mgtq.sampling.config import SamplerConfig
from mgtq.sampling.schedules import mask_ratio
from mgtq.sampling.tokens import remask_lowest, uniform_scores

__all__ = ["StartState", "inpaint_start", "img2img_start", "start_step_for_strength", "num_remasked",
           "check_strength"]


@dataclass(frozen=True)
class StartState:
    """Where `sample` starts instead of an all-mask grid.

    tokens (B, H, W): the initial token ids, the mask id where tokens are to be generated.
    fixed (B, H, W) bool or None: context positions, never re-masked or resampled; the schedule runs
        over the other positions only. None: nothing is fixed (img2img).
    first_step: the step index the loop starts at (0 = the first step; img2img starts later).
    """

    tokens: torch.Tensor
    fixed: torch.Tensor | None = None
    first_step: int = 0

    def __post_init__(self):
        if self.tokens.ndim != 3 or self.tokens.dtype != torch.long:
            raise ValueError(f"start tokens must be token ids (B, H, W) of dtype long, got "
                             f"{self.tokens.dtype} {tuple(self.tokens.shape)}")
        if self.fixed is not None and (self.fixed.shape != self.tokens.shape or self.fixed.dtype != torch.bool):
            raise ValueError(f"start fixed must be a bool mask of the tokens' shape {tuple(self.tokens.shape)}, got "
                             f"{self.fixed.dtype} {tuple(self.fixed.shape)}")
        if isinstance(self.first_step, bool) or not isinstance(self.first_step, int) or self.first_step < 0:
            raise ValueError(f"first_step must be a step index ≥ 0, got {self.first_step!r}")

    def check(self, batch_size: int, grid: tuple[int, int], mask_id: int, config: SamplerConfig) -> None:
        """Errors for a start that does not fit this sampling call."""
        if tuple(self.tokens.shape) != (batch_size, *grid):
            raise ValueError(f"start tokens {tuple(self.tokens.shape)} do not match batch {batch_size} × grid {grid}")
        if self.first_step >= config.num_steps:
            raise ValueError(f"start step {self.first_step} is beyond the last step {config.num_steps - 1}")
        z_steps = config.zsampling.steps if config.zsampling.enabled else None
        if z_steps and max(z_steps) < self.first_step:  # a trick asked for that would silently never run
            raise ValueError(f"zsampling.steps {list(z_steps)} all come before this edit's first step "
                             f"{self.first_step} (its strength runs steps {self.first_step}..{config.num_steps - 1}): "
                             "no Z-sampling step would run; give steps in that range, a higher strength, or "
                             "zsampling.steps null")
        masked = self.tokens == mask_id
        if not masked.flatten(1).any(-1).all():
            raise ValueError("every sample of a start state needs at least one masked token to generate")
        if self.fixed is not None and (masked & self.fixed).any():
            raise ValueError("a fixed position holds the mask id: fixed tokens are context and must be real tokens")


def inpaint_start(tokens: torch.Tensor, repaint: torch.Tensor, mask_id: int, first_step: int = 0) -> StartState:
    """tokens (B, H, W) of the image and repaint (B, H, W) bool → the start with repaint as [MASK], the rest fixed,
    at step `first_step` (`start_step_for_strength`)."""
    if repaint.shape != tokens.shape:
        raise ValueError(f"repaint mask {tuple(repaint.shape)} ≠ tokens {tuple(tokens.shape)}")
    empty = (~repaint.flatten(1).any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"the mask of image(s) {empty} repaints nothing (all black): nothing to do; "
                         "paint the area to repaint white")
    return StartState(tokens=torch.where(repaint, torch.full_like(tokens, mask_id), tokens), fixed=~repaint,
                      first_step=first_step)


def num_remasked(config: SamplerConfig, first_step: int, num_tokens: int) -> int:
    """How many of num_tokens an img2img start at `first_step` re-masks: all at step 0, else ⌊N·σ(i/T)⌋, at least
    1: what text-to-image keeps masked after step i − 1 (`mgtq.sampling.maskgit.num_to_mask`), unless its
    schedule decodes less than a token a step before there (long runs' first steps), where text-to-image, which
    decodes at least one a step, holds a few fewer."""
    if first_step == 0:
        return num_tokens
    ratio = mask_ratio(config.schedule, first_step / config.num_steps, config.rho)
    return max(1, min(num_tokens, int(num_tokens * ratio)))


def start_step_for_strength(config: SamplerConfig, strength: float) -> int:
    """T − int(T·strength): the step an edit at `strength` starts at, so that its last int(T·strength) steps run
    (diffusers' aMUSEd and the official Meissonic pipelines count them so); 0 at strength 1."""
    strength = check_strength(strength)
    steps = int(config.num_steps * strength)
    if steps == 0:
        raise ValueError(f"strength {strength:g} runs no step of {config.num_steps} (int(steps × strength) = 0): "
                         f"use a strength of at least 1/{config.num_steps} = {1 / config.num_steps:.3g}, or more steps")
    return config.num_steps - steps


def img2img_start(tokens: torch.Tensor, strength: float, mask_id: int, config: SamplerConfig,
                  generators: list[torch.Generator]) -> StartState:
    """tokens (B, H, W) of the image → the start at `start_step_for_strength`, with `num_remasked` random tokens of
    each sample re-masked.

    The positions are the lowest of per-sample uniform scores (one draw per sample from its
    generator). At strength 1 every token is re-masked and nothing is drawn, so the run is the
    text-to-image run of the same seed.
    """
    if len(generators) != tokens.shape[0]:
        raise ValueError(f"need one generator per image: got {len(generators)} for {tokens.shape[0]}")
    first_step = start_step_for_strength(config, strength)
    b, h, w = tokens.shape
    n = num_remasked(config, first_step, h * w)
    if n == h * w:
        remask = torch.ones_like(tokens, dtype=torch.bool)
    else:
        scores = uniform_scores((h * w,), generators, tokens.device)
        remask = remask_lowest(scores, torch.full((b,), n, device=tokens.device)).view(b, h, w)
    return StartState(tokens=torch.where(remask, torch.full_like(tokens, mask_id), tokens), first_step=first_step)


def check_strength(strength: float) -> float:
    """img2img's strength must be a number in (0, 1] (a numpy or 0-d torch scalar too); returns it as a float."""
    strength = plain_scalar(strength)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (the share of the schedule's steps run), "
                         f"got {strength!r}")
    return float(strength)
