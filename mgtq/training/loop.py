"""One resumable training loop on accelerate, shared by MGT training and SCQ's QAT.

The caller builds the model, optimizer (and scheduler), prepares them with its `Accelerator` and
passes a `loss_fn(step, micro)` that draws its own batch from a generator seeded by (step, micro):
then the batches after a resume are the ones an uninterrupted run would have drawn, and with the
optimizer, scheduler and RNG states restored (`mgtq.training.state`: safetensors and JSON, no
pickle) a resumed run ends byte-identical to an uninterrupted one.

The state folder (written atomically every `save_every` steps) holds that state and
`trainer.json` = {"step": next step, "recent_losses": [...], **info}, covered by the state's
checksums; a state is resumed only while its info matches the `identity` the caller passes (e.g. the
fingerprint of everything the training depends on) and its step is one these loop settings save at.
The recent losses travel with the state so that what is computed from them (a final loss, a log
line) is also the same after a resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mgtq.config import validate
from mgtq.files import atomic_directory, read_json, recover_atomic_target, write_json
from mgtq.training.state import (STATE_FILE, OutdatedTrainingState, checked_meta, load_training_state,
                                 save_training_state)

TRAINER_FILE = "trainer.json"
LOSS_HISTORY = 1000  # losses kept in the state: enough for any log window


@dataclass(frozen=True)
class LoopSettings:
    """steps: total optimizer steps; accumulation: micro-batches per step (accelerate's gradient
    accumulation); save_final: also save the state after the last step (else the caller saves the
    result itself); nan_hint: what the user should do when the loss stops being finite."""

    steps: int
    save_every: int
    accumulation: int = 1
    grad_clip: float = 1.0
    save_final: bool = False
    desc: str = "training"
    nan_hint: str = "lower the learning rate and run again to resume"

    def __post_init__(self):
        validate(self, "loop")
        if self.steps < 0 or self.save_every < 1 or self.accumulation < 1:
            raise ValueError(f"loop settings need steps ≥ 0, save_every ≥ 1 and accumulation ≥ 1, got {self}")


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate factor of optimizer step `step` (from 0) of `total`: linear warm-up to 1 over the first
    `warmup` steps, then cosine decay to `min_ratio` at step `total` (and `min_ratio` after it). A LambdaLR's
    lambda; the MGT and VQ trainers share it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resume(accelerator, state_dir: Path, model, optimizer, scheduler=None,
           identity: dict | None = None, *, settings: LoopSettings) -> tuple[int, dict]:
    """Load the saved state in `state_dir` into the prepared model/optimizer/scheduler when its info
    matches `identity`: (next step, saved info).

    (0, {}) when there is nothing to resume, and with a warning for a state of another run or of an
    earlier mgtq (no digest covers its step and settings). A corrupt or altered state, or one whose
    step the loop with `settings` would not have saved at, is an error saying what to do. Debris of a
    save that was killed is cleaned first (a state whose swap was cut short is restored), so a kill at
    any moment loses at most the steps since the last save.
    """
    state_dir = Path(state_dir)
    if accelerator.is_main_process:
        recover_atomic_target(state_dir)
    accelerator.wait_for_everyone()
    if not (state_dir / TRAINER_FILE).exists() and not (state_dir / STATE_FILE).exists():
        return 0, {}
    try:
        meta = checked_meta(state_dir, (TRAINER_FILE,))  # trainer.json too, before it is read
    except OutdatedTrainingState:
        _say(accelerator, f"the training state in {state_dir} was written by an earlier mgtq, with no digest "
                          "over its step and settings: starting over")
        return 0, {}
    info = read_json(state_dir / TRAINER_FILE)
    changed = {k: (info.get(k), v) for k, v in (identity or {}).items() if info.get(k) != v}
    if changed:
        said = "; ".join(f"{k} {old!r} there, {new!r} now" for k, (old, new) in changed.items())
        _say(accelerator, f"the training state in {state_dir} was saved by another run ({said}): starting over")
        return 0, {}
    step = info.get("step")
    if not saves_at(step, settings):
        raise ValueError(f"{state_dir / TRAINER_FILE}: step {step!r} is not one {settings.desc} saves a state at "
                         f"(every {settings.save_every} of {settings.steps} steps"
                         f"{', and the last' if settings.save_final else ''}): the state was saved with other "
                         f"settings or altered; run with the settings it was saved with, or delete {state_dir} to "
                         "start this training over")
    load_training_state(state_dir, accelerator, model, optimizer, scheduler, meta=meta)
    return step, info


def saves_at(step, settings: LoopSettings) -> bool:
    """Whether the loop with `settings` saves a state at `step` (the next step of the state): every
    `save_every` steps before the last, and after the last with `save_final`."""
    if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
        return False
    if step == settings.steps:
        return settings.save_final
    return step < settings.steps and step % settings.save_every == 0


def _say(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        warnings.warn(message, stacklevel=3)


def save(accelerator, state_dir: Path, step: int, losses: list[float], model, optimizer, scheduler=None,
         info: dict | None = None) -> None:
    """Save the training state with trainer.json among its checked files, atomically (main process)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(state_dir) as tmp:
            write_json(tmp / TRAINER_FILE, {**(info or {}), "step": step, "recent_losses": losses[-LOSS_HISTORY:]})
            save_training_state(tmp, accelerator, model, optimizer, scheduler, extra=(TRAINER_FILE,))
    accelerator.wait_for_everyone()


def train(accelerator, model, optimizer, loss_fn: Callable[[int, int], torch.Tensor], settings: LoopSettings,
          state_dir: Path, start: int = 0, info: dict | None = None, scheduler=None, progress: bool = True,
          on_save: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Steps `start` … settings.steps − 1; returns the loss of every micro-batch, those before a
    resume as far as the state kept them (`info` is what :func:`resume` returned, plus anything the
    caller wants saved with the state).

    Raises FloatingPointError at the first non-finite loss, before it touches the weights; the last
    saved state stays in `state_dir`. `on_save(step, losses)` runs after each save (e.g. to log).
    """
    s = settings
    if accelerator.gradient_accumulation_steps != s.accumulation:
        # accumulate() decides when to step from the Accelerator's count, the loop draws from settings': they
        # must agree, or each micro-batch steps the optimizer (or steps straddle two loop steps)
        raise ValueError(f"{s.desc}: the Accelerator accumulates {accelerator.gradient_accumulation_steps} "
                         f"micro-batches a step, the loop settings {s.accumulation}; create it with "
                         f"Accelerator(gradient_accumulation_steps={s.accumulation})")
    info = dict(info or {})
    losses: list[float] = list(info.pop("recent_losses", []))
    info.pop("step", None)
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc=s.desc,
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        for micro in range(s.accumulation):
            with accelerator.accumulate(model):
                loss = loss_fn(step, micro)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{s.desc}: the loss became {loss.item()} at step {step}; stopped. The last good state is "
                        f"kept in {state_dir}; {s.nan_hint}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the summed gradient of the step, once: clipping each partial
                    accelerator.clip_grad_norm_(model.parameters(), s.grad_clip)  # sum damps the first ones
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        done = step + 1
        if (done % s.save_every == 0 and done < s.steps) or (s.save_final and done == s.steps):
            save(accelerator, state_dir, done, losses, model, optimizer, scheduler, info)
            if on_save is not None:
                on_save(done, losses)
    accelerator.wait_for_everyone()
    return losses
