"""The MaskGIT sampling loop of Meissonic (official vanilla sampler) and the paper's enhanced tricks.

Each step i of T (DESIGN.md "Sampling"):
    ℓ = ℓu + s(ℓc − ℓu)                                  CFG on logits (inside model_fn)
    ℓ ← ℓ + I(t)·ε                                        noise regularization      (tricks/noise.py)
    p = softmax(ℓ)
    p ← D = p + c(p − p_{i−1})                            2nd-order momentum solver (tricks/momentum.py)
    p ← |p − p_{i−1}| on the z% lowest-KL tokens          differential sampling     (tricks/differential.py)
    x̂ ~ p where masked                                    multinomial, per-sample generator
    n = clamp(⌊N·σ((i+1)/T)⌋, 1, #masked − 1)             (the last step decodes everything)
    re-mask the n lowest of log p(x̂) + τ_i·Gumbel,  τ = linspace(2, 0, T); decoded tokens stay.
and, on a Z-step, the step is run, inverted by re-masking and run again (tricks/zsampling.py).
With context reuse (config.reuse, mgtq.reuse) a full step every `interval` steps runs the whole model and
caches its keys/values; the local steps between compute only a group of tokens against them.
Editing starts from a given grid instead of all-mask (start.py): fixed tokens are never re-masked,
and N counts the positions that are not fixed.

With every trick at its neutral setting the loop is the vanilla sampler, token for token. Random
numbers come from one torch.Generator per sample, so a sample's image does not depend on what else
is in the batch; the state a trick needs (the previous step's probabilities) lives in one call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable

import torch
from tqdm.auto import tqdm

from mgtq.finite import all_finite
from mgtq.reuse.cache import ContextCache
from mgtq.sampling.tricks.reuse import decoded_until, most_confident, most_confident_cells
from mgtq.sampling.config import SamplerConfig
from mgtq.sampling.schedules import mask_ratio, timestep_value
from mgtq.sampling.start import StartState
from mgtq.sampling.tokens import gumbel_noise, remask_lowest, sample_tokens
from mgtq.sampling.tricks.differential import differential_probs
from mgtq.sampling.tricks.momentum import second_order_coefficient, second_order_probs
from mgtq.sampling.tricks.noise import noise_intensity, regularize_logits, step_progress
from mgtq.sampling.tricks.zsampling import invert_by_remasking, z_step_applies

__all__ = ["ModelFn", "classifier_free_guidance", "StepState", "SamplerHooks", "SampleResult", "sample", "gumbel_noise",
           "sample_tokens", "remask_lowest", "num_to_mask", "gumbel_temperature"]

# model_fn(tokens (B, H, W), timestep (B,)) → guided logits (B, V, H, W); the pipeline builds it
# (text conditioning and CFG live there). Masked Z-sampling also calls
# model_fn(tokens, timestep, guidance_scale=s) for its inversion pass, with s taken literally:
# ℓu + s(ℓc − ℓu), so s = 0 is the unconditional prediction and s = 1 the conditional one.
ModelFn = Callable[..., torch.Tensor]


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ℓu + s(ℓc − ℓu) in float32, for model_fn; logits of any float dtype and memory layout (kept).

    The same roundings as the three-operation expression, computed in place on a float32 copy of `cond`
    (the expression allocated four full-size tensors and converted both halves at once: a sixth of a
    sampler step at 64×64 × 8192).
    """
    uncond = uncond.float()
    return cond.to(torch.float32, copy=True).sub_(uncond).mul_(scale).add_(uncond)


@dataclass
class StepState:
    """What one step knows: step index, schedule position, the per-sample generators, and
    editable (B, N) bool, the positions the schedule runs over (None: all; editing fixes the rest)."""

    step: int
    num_steps: int
    generators: list[torch.Generator]
    editable: torch.Tensor | None = None


@dataclass
class SampleResult:
    """tokens (B, H, W); nfe: how many times model_fn was called (a CFG call counts once); local_nfe:
    how many of those calls were local steps of context reuse (computing a few tokens); token_nfe: the
    calls counted by the image tokens they computed, a local step as its fraction (the Linear layers'
    share of the cost; attention's is larger)."""

    tokens: torch.Tensor
    nfe: int
    local_nfe: int = 0
    token_nfe: float = 0.0


class SamplerHooks:
    """Extension points of the loop; the defaults change nothing.

    adjust_logits: after CFG and noise regularization, before softmax;
    adjust_probs: after softmax, before the momentum solver and differential sampling.
    Under context reuse a local step computes only its active tokens: the other rows are zero logits (uniform
    probabilities), which the sampler does not read; a hook that reads every token sees them too.
    """

    def adjust_logits(self, logits: torch.Tensor, state: StepState) -> torch.Tensor:  # (B, N, V)
        return logits

    def adjust_probs(self, probs: torch.Tensor, state: StepState) -> torch.Tensor:  # (B, N, V)
        return probs


# ------------------------------------------------------------------------------ vanilla pieces
def num_to_mask(config: SamplerConfig, step: int, num_tokens: int | torch.Tensor,
                num_masked: torch.Tensor) -> torch.Tensor:
    """n = clamp(⌊N·σ((i+1)/T)⌋, 1, #masked − 1) per sample (B,); 0 at the last step.

    num_tokens: N, an int or one per sample (B,) (editing: the positions that are not fixed).
    """
    if step == config.num_steps - 1:
        return torch.zeros_like(num_masked)
    ratio = mask_ratio(config.schedule, (step + 1) / config.num_steps, config.rho)
    # float64 floor of N·σ: int(N·σ) of a Python int and float, for one N or one per sample. On the host: Apple's
    # mps has no float64 (the official scheduler computes in float32: see README "Enhanced sampler")
    count = num_tokens.cpu() if isinstance(num_tokens, torch.Tensor) else num_tokens
    target = (torch.as_tensor(count, dtype=torch.float64) * ratio).floor().long().to(num_masked.device)
    n = torch.minimum(num_masked - 1, target.expand_as(num_masked))
    return n.clamp(min=1)


def gumbel_temperature(config: SamplerConfig, step: int) -> float:
    """τ_i of linspace(τ0, τ1, T), as the official scheduler builds it, but in float64 (the official table is
    float32: the two differ by one float32 rounding at some steps).

    Computed for step i alone (building the T-long table every step made memory grow with T), bit for
    bit as torch.linspace's float64 CPU kernel does: from the start in the first half, from the end in
    the second, each with one fused multiply-add (one rounding: what Fraction's exact sum rounds to).
    """
    (start, end), last = config.gumbel_temperature, config.num_steps - 1
    if last == 0:
        return float(start)
    delta = (end - start) / last
    if step < config.num_steps // 2:
        return float(Fraction(start) + Fraction(delta) * step)
    return float(Fraction(end) - Fraction(delta) * (last - step))


def unmask_step(tokens: torch.Tensor, probs: torch.Tensor, mask_id: int, config: SamplerConfig,
                state: StepState) -> torch.Tensor:
    """Sample masked tokens from probs (B, N, V) and re-mask the schedule's count: (B, N) → (B, N).

    This is the first-order step of Eq. 4: N·σ_t tokens stay masked, the most confident of the
    rest come from the prediction; decoded tokens never change.
    """
    return _unmask(tokens, probs, mask_id, config, state)[0]


def _unmask(tokens, probs, mask_id, config, state, group=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """unmask_step, also returning the confidence (B, N) it ranked by (None at the last step).

    group (B, N) bool or None: masked tokens outside it stay masked (a local step of context reuse
    decodes only its group; the schedule's count leaves room for them).
    """
    masked = tokens == mask_id
    drawn = sample_tokens(probs, state.generators, None if group is None else group & masked)
    sampled = torch.where(masked, drawn, tokens)  # outside the group a masked token stays masked (below)
    num_tokens = tokens.shape[1] if state.editable is None else state.editable.sum(-1)
    n_mask = num_to_mask(config, state.step, num_tokens, masked.sum(-1))
    if int(n_mask.max()) == 0:
        if group is not None and bool((masked & ~group).any()):  # they were not drawn (id 0): never decode them
            raise RuntimeError("context reuse's last step left masked tokens outside its group; this is a bug, "
                               "please report it (workaround: reuse.interval 1)")
        return sampled, None
    chosen_p = probs.gather(-1, sampled[..., None])[..., 0]
    tau = gumbel_temperature(config, state.step)
    noise = torch.stack([gumbel_noise(chosen_p.shape[1:], g, chosen_p.device) for g in state.generators])
    confidence = torch.log(chosen_p.clamp(1e-20)) + tau * noise
    # Decoded tokens are never re-masked: they rank above every masked one.
    confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
    ranked = confidence if group is None else confidence.masked_fill(masked & ~group, float("-inf"))
    remask = remask_lowest(ranked, n_mask)
    return torch.where(remask, torch.full_like(sampled, mask_id), sampled), confidence


# ------------------------------------------------------------------------- composing the tricks
def step_distribution(
    logits: torch.Tensor, prev_probs: torch.Tensor | None, config: SamplerConfig, state: StepState,
    hooks: SamplerHooks,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided logits (B, N, V) → (prediction p_i, distribution to sample from), both (B, N, V).

    p_i (after noise and hooks, before momentum/differential) is what the next step compares
    against; prev_probs is p_{i−1} of the same sampling call, or None at the first step.
    """
    if config.noise.enabled:
        t = step_progress(state.step, state.num_steps)
        intensity = noise_intensity(config.noise.curve, t, config.noise.scale, config.noise.knots)
        logits = regularize_logits(logits, intensity, state.generators)
    logits = hooks.adjust_logits(logits, state)
    _check_finite(logits, config, state)
    prediction = hooks.adjust_probs(logits.float().softmax(-1), state)
    probs = prediction
    if prev_probs is not None:
        if config.momentum.order == 2:
            probs = second_order_probs(probs, prev_probs, momentum_coefficient(config, state.step))
        if config.differential.enabled:
            probs = differential_probs(probs, prev_probs, config.differential.percent, config.differential.resample,
                                       editable=state.editable)
    return prediction, probs


def _check_finite(logits: torch.Tensor, config: SamplerConfig, state: StepState) -> None:
    """Refuse NaN/inf logits (B, N, V) before softmax and multinomial fail on them, naming the cause."""
    if all_finite(logits):  # one aminmax pass: an elementwise check was a tenth of a sampler step
        return
    causes = [f"guidance_scale {config.guidance_scale:g}"] if config.use_cfg else []
    if config.noise.enabled:
        causes.append(f"noise.scale {config.noise.scale:g}")
    cause = " or ".join(causes) or "the model (its logits are NaN or infinite without guidance or noise)"
    raise FloatingPointError(f"the logits at sampling step {state.step} are not finite: {cause} is too large for "
                             f"{logits.dtype} logits; lower it (CLI: --cfg, --noise-scale), or load the model in "
                             "float32 (--dtype fp32)")


def momentum_coefficient(config: SamplerConfig, step: int) -> float:
    """c of Eq. 13 at step i from the schedule's σ((i−1)/T), σ(i/T), σ((i+1)/T); 0 at step 0."""
    if step == 0:
        return 0.0
    sigma = [mask_ratio(config.schedule, (step + d) / config.num_steps, config.rho) for d in (-1, 0, 1)]
    return second_order_coefficient(*sigma)


class _CountedModel:
    """model_fn seen by the loop: flat tokens (B, N) in, logits (B, N, V) out, calls counted (NFE).

    Lives for one `sample` call, so the count cannot leak into the next one. The "mask_ratio"
    timestep is the masked fraction of the positions the schedule runs over (`editable` (B, N) bool,
    None = all): in editing it follows the schedule as the step index does, 1 at the start.
    """

    def __init__(self, model_fn: ModelFn, grid: tuple[int, int], mask_id: int, config: SamplerConfig, device,
                 editable: torch.Tensor | None = None):
        self.model_fn, self.grid, self.mask_id, self.config, self.device = model_fn, grid, mask_id, config, device
        self.num_editable = None if editable is None else editable.sum(-1)
        self.nfe = 0

    def __call__(self, tokens: torch.Tensor, step: int, guidance_scale: float | None = None,
                 token_hook=None) -> torch.Tensor:
        batch = tokens.shape[0]
        masked = tokens == self.mask_id
        ratio = masked.float().mean(-1) if self.num_editable is None else masked.sum(-1) / self.num_editable
        timestep = timestep_value(self.config.convention, step, self.config.num_steps, ratio)
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=self.device).expand(batch)
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        if token_hook is not None:
            kwargs["token_hook"] = token_hook
        logits = self.model_fn(tokens.view(batch, *self.grid), timestep, **kwargs)  # (B, V, H, W)
        self.nfe += 1
        return logits.flatten(2).transpose(1, 2)  # (B, N, V)


def _accepts(model_fn: ModelFn, name: str) -> bool:
    try:
        params = inspect.signature(model_fn).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell (e.g. a C callable): let the call decide
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _denoise(model: _CountedModel, tokens, prev_probs, mask_id, config, state, hooks):
    """One model pass + one step at state.step: → (new tokens (B, N), prediction p_i (B, N, V))."""
    logits = model(tokens, state.step)
    prediction, probs = step_distribution(logits, prev_probs, config, state, hooks)
    return unmask_step(tokens, probs, mask_id, config, state), prediction


def _z_step(model: _CountedModel, tokens, prev_probs, mask_id, config, state, hooks):
    """Masked Z-sampling at step i: step i→i+1, invert to i by re-masking, step i→i+1 again."""
    z = config.zsampling
    forward, _ = _denoise(model, tokens, prev_probs, mask_id, config, state, hooks)
    inversion_logits = None
    if z.variant == "masked":
        # z_{i+1} is the input of step i+1: its timestep is that step's (clamped at the last step)
        inversion_logits = model(forward, min(state.step + 1, config.num_steps - 1), guidance_scale=z.inversion_cfg)
    back = invert_by_remasking(tokens, forward, mask_id, z.variant, state.generators, inversion_logits, z.remask,
                               editable=state.editable)
    # the re-step compares with the same committed p_{i−1}: the tentative pass is not a step
    return _denoise(model, back, prev_probs, mask_id, config, state, hooks)


class _ContextReuse:
    """Context reuse over one sampling call (mgtq.reuse): the cache of the last full step, and the
    tokens the local steps after it compute (`active`) and may decode (`group`, None = any masked)."""

    def __init__(self, config: SamplerConfig, first_step: int, mask_id: int):
        self.config, self.reuse, self.first_step, self.mask_id = config, config.reuse, first_step, mask_id
        self.cache = ContextCache(self.reuse.bucket, self.reuse.refresh)
        self.active = self.group = None
        self.returned = None  # the tokens the last step returned
        self.local_steps, self.local_cost = 0, 0.0  # local steps, and the fractions of tokens they computed

    def step(self, model: _CountedModel, tokens, prev_probs, state: StepState, hooks):
        """One full or local step at state.step: → (new tokens (B, N), prediction p_i (B, N, V)).

        A step callback that changed the tokens (re-masked some, or replaced decoded ones) makes this step full:
        the plan and the cached context were made for the tokens the sampler had."""
        config, steps_run = self.config, state.step - self.first_step
        changed = self.returned is not None and not torch.equal(tokens, self.returned)
        full = self.active is None or changed or self.reuse.is_full(steps_run)
        if full:
            hook = self.cache.full_step()
        else:
            hook = self.cache.local_step(self.active.view(tokens.shape[0], *model.grid))
        logits = model(tokens, state.step, token_hook=hook)
        if not full:
            self.local_steps, self.local_cost = self.local_steps + 1, self.local_cost + self.cache.computed
        prediction, probs = step_distribution(logits, prev_probs, config, state, hooks)
        new, confidence = _unmask(tokens, probs, self.mask_id, config, state, None if full else self.group)
        if full and confidence is not None:
            self._plan_local_steps(tokens, new, confidence, state, steps_run, model.grid)
        self.returned = new.clone()  # a callback may write into `new` in place
        return new, prediction

    def _plan_local_steps(self, before, after, confidence, state: StepState, steps_run: int, grid) -> None:
        """After a full step: what the local steps up to the next full step compute and decode."""
        masked_before, masked_after = before == self.mask_id, after == self.mask_id
        decoded_now = masked_before & ~masked_after  # their input changed after the cache was built
        if self.reuse.group == "masked":
            self.group, self.active = None, masked_before
            return
        until = state.step + 1
        while until < self.config.num_steps and not self.reuse.is_full(steps_run + until - state.step):
            until += 1
        num_tokens = before.shape[1] if state.editable is None else state.editable.sum(-1)
        size = decoded_until(lambda step, n, m: num_to_mask(self.config, step, n, m), state.step, until, num_tokens,
                             masked_after.sum(-1))
        if self.reuse.group == "cells":
            self.group = most_confident_cells(confidence, masked_after, size, grid)
        else:
            self.group = most_confident(confidence, masked_after, size)
        self.active = decoded_now | self.group


def _check_reuse(config: SamplerConfig, model_fn: ModelFn) -> None:
    """Refuse the combinations context reuse leaves out, naming them and the fix."""
    tricks = [name for name, on in (("differential sampling", config.differential.enabled),
                                    ("the 2nd-order momentum solver", config.momentum.order == 2),
                                    ("Z-sampling", config.zsampling.enabled)) if on]
    if tricks:
        raise ValueError(f"context reuse (reuse.interval {config.reuse.interval}) does not combine with "
                         f"{' or '.join(tricks)}: a local step computes a few tokens' probabilities, and these "
                         "tricks read every token's; set reuse.interval to 1 (CLI: --reuse-interval 1) or turn them off")
    if not _accepts(model_fn, "token_hook"):
        raise TypeError("context reuse calls model_fn(tokens, timestep, token_hook=h) and passes h to the transformer, "
                        "but this model_fn has no token_hook parameter; add one (MGTPipeline's model_fn has it) or "
                        "set reuse.interval to 1")


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
    return_info: bool = False,
    start: StartState | None = None,
) -> torch.Tensor | SampleResult:
    """Run the sampler from an all-mask grid, or from `start` (editing: mgtq.sampling.start); returns
    token ids (B, H, W), or a SampleResult (tokens and NFE) with return_info=True.

    model_fn receives the token grid and the per-sample timestep of the configured convention
    (and guidance_scale=… for masked Z-sampling's inversion pass). callback(step, tokens (B, H, W))
    sees every committed step.

    Runs in inference mode; the tokens it returns are ordinary tensors (a copy made outside it), which a caller
    may write into or use in autograd, as a diffusers pipeline's outputs.
    """
    result = _sample(model_fn, batch_size, grid, mask_id, config, generators, device, hooks, progress, callback,
                     return_info, start)
    with torch.inference_mode(False):
        if not return_info:
            return result.clone()
        return replace(result, tokens=result.tokens.clone())


@torch.inference_mode()
def _sample(model_fn, batch_size, grid, mask_id, config, generators, device, hooks, progress, callback, return_info,
            start):
    if len(generators) != batch_size:
        raise ValueError(f"need one generator per sample: got {len(generators)} for batch {batch_size}")
    z = config.zsampling
    if z.variant == "masked" and z.enabled and not _accepts(model_fn, "guidance_scale"):
        raise TypeError(
            "masked Z-sampling calls model_fn(tokens, timestep, guidance_scale=s) for its inversion pass, but "
            "this model_fn has no guidance_scale parameter; add one (MGTPipeline's model_fn has it) or use "
            "zsampling variant 'random'/'recover'"
        )
    if config.reuse.enabled:
        _check_reuse(config, model_fn)
    hooks = hooks or SamplerHooks()
    height, width = grid
    tokens, editable, first_step = _initial_state(start, batch_size, grid, mask_id, config, device)
    model = _CountedModel(model_fn, grid, mask_id, config, device, editable)
    reuse = _ContextReuse(config, first_step, mask_id) if config.reuse.enabled else None  # state of this call only
    prev_probs = None  # p_{i−1}: state of this call only
    for step in tqdm(range(first_step, config.num_steps), desc="sampling", disable=not progress, leave=False):
        state = StepState(step=step, num_steps=config.num_steps, generators=generators, editable=editable)
        if reuse is not None:
            tokens, prediction = reuse.step(model, tokens, prev_probs, state, hooks)
        else:
            run = _z_step if z_step_applies(z.variant, z.steps, step, config.num_steps) else _denoise
            tokens, prediction = run(model, tokens, prev_probs, mask_id, config, state, hooks)
        prev_probs = prediction if config.keeps_previous_probs else None
        if callback is not None:
            callback(step, tokens.view(batch_size, height, width))
    tokens = tokens.view(batch_size, height, width)
    if not return_info:
        return tokens
    if reuse is None:
        return SampleResult(tokens=tokens, nfe=model.nfe, token_nfe=float(model.nfe))
    return SampleResult(tokens=tokens, nfe=model.nfe, local_nfe=reuse.local_steps,
                        token_nfe=model.nfe - reuse.local_steps + reuse.local_cost)


def _initial_state(start: StartState | None, batch_size: int, grid: tuple[int, int], mask_id: int,
                   config: SamplerConfig, device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(flat tokens (B, N), editable (B, N) bool or None, first step) of an all-mask grid or of `start`."""
    if start is None:
        return torch.full((batch_size, grid[0] * grid[1]), mask_id, dtype=torch.long, device=device), None, 0
    start.check(batch_size, grid, mask_id, config)
    tokens = start.tokens.to(device).reshape(batch_size, -1).clone()
    editable = None if start.fixed is None else ~start.fixed.to(device).reshape(batch_size, -1)
    return tokens, editable, start.first_step
