"""The MaskGIT sampling loop of Meissonic (official vanilla sampler), open to the paper's tricks.

Each step i of T (DESIGN.md "Sampling"):
    ℓ = ℓu + s(ℓc − ℓu)                                  CFG on logits, batch [uncond, cond]
    p = softmax(ℓ);  x̂ ~ p where masked                   multinomial, per-sample generator
    n = clamp(⌊N·σ((i+1)/T)⌋, 1, #masked − 1)             (the last step decodes everything)
    re-mask the n lowest of log p(x̂) + τ_i·Gumbel,  τ = linspace(2, 0, T); decoded tokens stay.

Random numbers come from one torch.Generator per sample, so a sample's image does not depend on
what else is in the batch. The enhanced sampler plugs in through `SamplerHooks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from mgtq.sampling.config import SamplerConfig
from mgtq.sampling.schedules import mask_ratio, timestep_value

# model_fn(tokens (B, H, W), timestep (B,)) → guided logits (B, V, H, W); the pipeline builds it
# (text conditioning and CFG live there).
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepState:
    """What one step knows: step index, schedule position, and the per-sample generators."""

    step: int
    num_steps: int
    generators: list[torch.Generator]


class SamplerHooks:
    """Extension points of the loop; the defaults are the vanilla sampler.

    adjust_logits: after CFG, before softmax (noise regularization lives here);
    adjust_probs: before sampling (differential sampling lives here).
    """

    def adjust_logits(self, logits: torch.Tensor, state: StepState) -> torch.Tensor:  # (B, N, V)
        return logits

    def adjust_probs(self, probs: torch.Tensor, state: StepState) -> torch.Tensor:  # (B, N, V)
        return probs


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Standard Gumbel noise −log(−log u), u ~ U(0, 1) clamped away from 0 as in the official code."""
    u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def sample_tokens(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """x̂ ~ p per token: probs (B, N, V) → ids (B, N), one generator per sample."""
    rows = []
    for b, gen in enumerate(generators):
        p = probs[b].float().to(gen.device)
        rows.append(torch.multinomial(p, 1, generator=gen)[:, 0].to(probs.device))
    return torch.stack(rows)


def remask_lowest(confidence: torch.Tensor, n_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, N): the n_mask[b] lowest-confidence positions of each row (ties broken by index)."""
    order = confidence.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks < n_mask[:, None]


def num_to_mask(config: SamplerConfig, step: int, num_tokens: int, num_masked: torch.Tensor) -> torch.Tensor:
    """n = clamp(⌊N·σ((i+1)/T)⌋, 1, #masked − 1) per sample (B,); 0 at the last step."""
    if step == config.num_steps - 1:
        return torch.zeros_like(num_masked)
    target = int(num_tokens * mask_ratio(config.schedule, (step + 1) / config.num_steps, config.rho))
    n = torch.minimum(num_masked - 1, torch.full_like(num_masked, target))
    return n.clamp(min=1)


def gumbel_temperature(config: SamplerConfig, step: int) -> float:
    """τ_i of linspace(τ0, τ1, T), as the official scheduler builds it."""
    return float(torch.linspace(*config.gumbel_temperature, config.num_steps, dtype=torch.float64)[step])


def maskgit_step(
    tokens: torch.Tensor, logits: torch.Tensor, mask_id: int, config: SamplerConfig, state: StepState,
    hooks: SamplerHooks,
) -> torch.Tensor:
    """One step: tokens (B, N), guided logits (B, N, V) → tokens (B, N) with fewer masks."""
    masked = tokens == mask_id
    probs = hooks.adjust_probs(hooks.adjust_logits(logits, state).float().softmax(-1), state)
    sampled = torch.where(masked, sample_tokens(probs, state.generators), tokens)
    n_mask = num_to_mask(config, state.step, tokens.shape[1], masked.sum(-1))
    if int(n_mask.max()) == 0:
        return sampled
    chosen_p = probs.gather(-1, sampled[..., None])[..., 0]
    tau = gumbel_temperature(config, state.step)
    noise = torch.stack([gumbel_noise(chosen_p.shape[1:], g, chosen_p.device) for g in state.generators])
    confidence = torch.log(chosen_p.clamp(1e-20)) + tau * noise
    # Decoded tokens are never re-masked: they rank above every masked one.
    confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
    remask = remask_lowest(confidence, n_mask)
    return torch.where(remask, torch.full_like(sampled, mask_id), sampled)


@torch.inference_mode()
def sample(
    model_fn: ModelFn,
    batch_size: int,
    grid: tuple[int, int],
    mask_id: int,
    config: SamplerConfig,
    generators: list[torch.Generator],
    device: torch.device | str = "cpu",
    hooks: SamplerHooks | None = None,
    progress: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from an all-mask grid; returns token ids (B, H, W).

    model_fn receives the token grid and the per-sample timestep of the configured convention.
    """
    if len(generators) != batch_size:
        raise ValueError(f"need one generator per sample: got {len(generators)} for batch {batch_size}")
    hooks = hooks or SamplerHooks()
    height, width = grid
    tokens = torch.full((batch_size, height * width), mask_id, dtype=torch.long, device=device)
    for step in tqdm(range(config.num_steps), desc="sampling", disable=not progress, leave=False):
        ratio = (tokens == mask_id).float().mean(-1)
        timestep = timestep_value(config.timestep_convention, step, config.num_steps, ratio)
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=device).expand(batch_size)
        logits = model_fn(tokens.view(batch_size, height, width), timestep)  # (B, V, H, W)
        logits = logits.flatten(2).transpose(1, 2)  # (B, N, V)
        state = StepState(step=step, num_steps=config.num_steps, generators=generators)
        tokens = maskgit_step(tokens, logits, mask_id, config, state, hooks)
        if callback is not None:
            callback(step, tokens.view(batch_size, height, width))
    return tokens.view(batch_size, height, width)
