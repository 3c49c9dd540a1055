"""Train the tiny VQ image tokenizer (diffusers ``VQModel``) on images of the shapes world.

Run: ``python -m mgtq.training.train_vq --out runs/vq --steps 3000 --export checkpoints/tiny-shapes/vqvae``

* Data: rendered on the fly. The batch of step k is a pure function of (seed, k), so a resumed run
  sees exactly the batches an uninterrupted one would; no data-loader state to save.
* Loss: L1 + MSE reconstruction + the quantizer's codebook/commitment loss. diffusers'
  ``VectorQuantizer`` defaults to ``legacy=True``, which puts β = 0.25 on the codebook term instead
  of the commitment term (a bug kept for backward compatibility); training sets ``legacy=False`` to
  get the VQ-VAE loss ‖sg[z] − e‖² + β‖z − sg[e]‖². The flag only affects the loss, not inference.
* Dead codes: the codebook is first initialised from encoder outputs of the first batch (the
  default uniform ±1/K init sits far from the encoder's range, so most codes would never win). Then
  every ``dead_code_every`` steps, codes not selected since the last check are re-initialised to
  random encoder outputs of the current batch (their Adam moments are zeroed), so the codebook
  stays in use. Usage counts are part of the checkpoint.
* Checkpoints: ``mgtq.training.state`` (model, optimizer, scheduler, RNG; safetensors + JSON) plus
  ``trainer_state.json`` / ``trainer_state.safetensors`` (step, code usage), written to a temporary
  directory and renamed into place, so an interrupted save never leaves a half checkpoint.
* Randomness: model init from ``seed`` (global RNG forked), data from ``numpy`` generators seeded
  by (seed, step), code re-init from a ``torch.Generator`` seeded by (seed, step).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..config import validate
from ..files import atomic_directory, recover_atomic_target, write_json
from ..shapes.world import render, sample_scene
from ..vq import VQConfig, build_vq, images_to_tensor, load_vq, roundtrip
from .loop import warmup_cosine
from .state import keeps_global_rng, load_training_state, save_training_state

CHECKPOINT_DIR = "checkpoint"
TRAINER_FILES = ("trainer_state.json", "trainer_state.safetensors")  # covered by the training state's checks
FINAL_DIR = "final"


@dataclass(frozen=True)
class VQTrainConfig:
    """Hyper-parameters of a VQ training run (everything needed to reproduce it)."""

    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr·min_lr_ratio at the last step
    seed: int = 0
    beta: float = 0.25  # commitment weight
    mse_weight: float = 1.0  # added to the L1 term: L1 for sharp edges, MSE for big colour errors
    grad_clip: float = 1.0
    dead_code_every: int = 50  # 0 disables dead-code re-initialisation
    dead_code_until: float = 0.8  # stop re-initialising after this fraction of steps (let it settle)
    checkpoint_every: int = 200
    log_every: int = 25
    eval_every: int = 0  # 0: only at the end; evaluation = ShapeBench round-trip scorer accuracy
    mixed_precision: Literal["no", "bf16"] = "no"  # accelerate's; bf16 works on CPU
    num_threads: int | None = 1  # torch CPU threads; None leaves torch's default
    model: VQConfig = field(default_factory=VQConfig)

    def __post_init__(self) -> None:
        validate(self)
        positive = ("steps", "batch_size", "checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.dead_code_every < 0 or self.eval_every < 0:
            raise ValueError("warmup_steps, dead_code_every and eval_every must be ≥ 0")
        if not 0 < self.min_lr_ratio <= 1 or not 0 <= self.dead_code_until <= 1:
            raise ValueError("min_lr_ratio must be in (0, 1] and dead_code_until in [0, 1]")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be ≥ 1 or None, got {self.num_threads}")
        if self.seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {self.seed}")


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def world_batch(seed: int, step: int, batch_size: int) -> np.ndarray:
    """The training images of ``step``: uint8 (B, 64, 64, 3), a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return np.stack([render(sample_scene(rng)) for _ in range(batch_size)])


def vq_forward(vq, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, 3, H, W) → (reconstruction (B, 3, H, W), vq loss (), indices (B·h·w,), latents z (B, C, h, w)).

    Calls the VQModel's parts directly so the pre-quantization latents are available for dead-code
    re-initialisation.
    """
    z = vq.quant_conv(vq.encoder(x))
    quant, vq_loss, (_, _, indices) = vq.quantize(z)
    recon = vq.decoder(vq.post_quant_conv(quant))
    return recon, vq_loss, indices.reshape(-1), z


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, mse_weight: float) -> torch.Tensor:
    return F.l1_loss(recon, x) + mse_weight * F.mse_loss(recon, x)


def sample_latents(z: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random latent vectors (n, C) drawn from z (B, C, h, w), with replacement if needed."""
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if n <= len(flat):
        idx = torch.randperm(len(flat), generator=generator)[:n]
    else:
        idx = torch.randint(len(flat), (n,), generator=generator)
    return flat[idx.to(flat.device)].clone()


@torch.no_grad()
def reinit_codes(embedding: torch.Tensor, codes: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Overwrite rows ``codes`` of ``embedding`` (K, C) with encoder outputs drawn from z.

    A little noise (1% of the latents' std) keeps several re-initialised codes from being identical.
    Adam's moments for those rows are zeroed so stale statistics do not drag the new codes away.
    """
    if len(codes) == 0:
        return
    fresh = sample_latents(z, len(codes), generator)
    noise = torch.randn(fresh.shape, generator=generator).to(fresh) * 0.01 * fresh.std().clamp_min(1e-6)
    embedding[codes.to(embedding.device)] = (fresh + noise).to(embedding.dtype)
    if optimizer is not None:
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state.get(embedding, {})
            if key in state:
                state[key][codes.to(embedding.device)] = 0


def _step_generator(seed: int, step: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, step): resuming needs no generator state.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# --------------------------------------------------------------------------------------------
# Checkpoints (atomic)
# --------------------------------------------------------------------------------------------


def save_checkpoint(accelerator, run_dir: Path, step: int, usage: torch.Tensor, config: VQTrainConfig,
                    model, optimizer, scheduler) -> Path:
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINT_DIR
    accelerator.wait_for_everyone()
    # One writer: the state (and the RNG state in it) is the main process's, as mgtq.training.loop.save keeps it.
    if accelerator.is_main_process:
        with atomic_directory(final) as tmp:
            save_file({"code_usage": usage.contiguous()}, str(tmp / "trainer_state.safetensors"))
            write_json(tmp / "trainer_state.json", {"step": step, "config": asdict(config)})
            save_training_state(tmp, accelerator, model, optimizer, scheduler, extra=TRAINER_FILES)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> tuple[int, torch.Tensor]:
    from safetensors.torch import load_file

    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    usage = load_file(str(checkpoint / "trainer_state.safetensors"))["code_usage"]
    return int(step), usage


def export_vq(vq, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` (config.json + safetensors) into ``out_dir``, atomically."""
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        vq.save_pretrained(str(tmp), safe_serialization=True)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_roundtrip(vq, per_category: int = 64, batch_size: int = 64) -> dict:
    """ShapeBench scorer accuracy on VQ round trips of the ground-truth images.

    Returns the :func:`mgtq.shapes.scorer.evaluate` dict plus "ground_truth_overall" (scorer on the
    originals, should be 1.0), "mean_abs_error" (uint8 units) and "codes_used".
    """
    from ..shapes.shapebench import render_ground_truth, shapebench_prompts
    from ..shapes.scorer import evaluate
    from ..vq import encode_to_tokens

    was_training = vq.training
    vq.eval()
    items = shapebench_prompts(per_category)
    truth = render_ground_truth(items)
    recon = roundtrip(vq, truth, batch_size)
    tokens = torch.cat([encode_to_tokens(vq, images_to_tensor(truth[i : i + batch_size]))
                        for i in range(0, len(truth), batch_size)])
    vq.train(was_training)
    result = evaluate(list(recon), items)
    result["ground_truth_overall"] = evaluate(list(truth), items)["overall"]
    result["mean_abs_error"] = float(np.abs(recon.astype(np.float64) - truth).mean())
    result["codes_used"] = int(tokens.unique().numel())
    return result


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------


@keeps_global_rng
def train_vq(out_dir: str | os.PathLike, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3,
             seed: int = 0, resume: bool = True, export_to: str | os.PathLike | None = None,
             progress: bool = True, stop_after: int | None = None, **overrides):
    """Train a VQ tokenizer into run directory ``out_dir``; returns the trained ``VQModel``.

    If ``out_dir/checkpoint`` exists and ``resume`` is True, training continues from it (the run's
    step count can be raised to train longer). The final model is saved with ``save_pretrained`` to
    ``out_dir/final`` and, if given, to ``export_to``. Other :class:`VQTrainConfig` fields (e.g.
    ``model=VQConfig(...)``, ``checkpoint_every``) can be passed as keyword overrides.

    ``stop_after``: end this call after that step (checkpointed, not exported) as if interrupted —
    for time-sliced training; a later call with the same arguments resumes and finishes the run.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config = VQTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, **overrides)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())

    vq = build_vq(config.model, seed=config.seed)
    vq.quantize.beta = config.beta
    vq.quantize.legacy = False  # see module docstring: standard VQ-VAE loss weighting
    optimizer = torch.optim.Adam(vq.parameters(), lr=config.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.steps, config.warmup_steps, config.min_lr_ratio)
    )
    vq, optimizer, scheduler = accelerator.prepare(vq, optimizer, scheduler)
    model = accelerator.unwrap_model(vq)
    codebook = model.quantize.embedding.weight
    num_codes = config.model.num_vq_embeddings

    start, usage, last_dead = 0, torch.zeros(num_codes, dtype=torch.long), 0
    checkpoint = run_dir / CHECKPOINT_DIR
    if resume and accelerator.is_main_process:
        recover_atomic_target(checkpoint)  # a save killed mid-swap leaves its last complete copy beside it
    accelerator.wait_for_everyone()
    if resume and checkpoint.exists():
        load_training_state(checkpoint, accelerator, vq, optimizer, scheduler, extra=TRAINER_FILES)
        start, usage = load_trainer_state(checkpoint)
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", asdict(config))
    if stop_after is not None and start >= min(stop_after, config.steps) and start < config.steps:
        return model

    log_path = run_dir / "log.jsonl"
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
               desc="vq", dynamic_ncols=True)
    vq.train()
    t0 = time.time()
    for step in bar:
        x = images_to_tensor(world_batch(config.seed, step, config.batch_size)).to(accelerator.device)
        generator = _step_generator(config.seed, step)
        if step == 0:
            with torch.no_grad():  # data-dependent codebook init (see module docstring)
                z0 = model.quant_conv(model.encoder(x))
                reinit_codes(codebook, torch.arange(num_codes), z0, generator)
        with accelerator.autocast():
            recon, vq_loss, indices, z = vq_forward(model, x)
            rec_loss = reconstruction_loss(recon.float(), x, config.mse_weight)
            loss = rec_loss + vq_loss.float()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(vq.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        usage += torch.bincount(indices.detach().cpu(), minlength=num_codes)

        done = step + 1
        if config.dead_code_every and done % config.dead_code_every == 0:
            if done <= config.dead_code_until * config.steps:
                dead = torch.nonzero(usage == 0).flatten()
                last_dead = len(dead)
                reinit_codes(codebook, dead, z, generator, getattr(optimizer, "optimizer", optimizer))
            usage.zero_()  # usage counts one window of dead_code_every steps
        if done % config.log_every == 0 or done == config.steps:
            record = {"step": done, "loss": loss.item(), "recon": rec_loss.item(), "vq": vq_loss.item(),
                      "lr": scheduler.get_last_lr()[0], "codes_in_batch": int(indices.unique().numel()), "last_dead_codes": last_dead,
                      "elapsed_s": round(time.time() - t0, 1)}
            bar.set_postfix(recon=f"{record['recon']:.4f}", vq=f"{record['vq']:.4f}",
                            codes=record["codes_in_batch"])
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            _log_eval(model, log_path, done)
        stopping = stop_after is not None and done >= stop_after
        if done % config.checkpoint_every == 0 or done == config.steps or stopping:
            save_checkpoint(accelerator, run_dir, done, usage, config, vq, optimizer, scheduler)
        if stopping:
            break
    bar.close()
    if stop_after is not None and stop_after < config.steps:
        return model

    model.eval()
    export_vq(model, run_dir / FINAL_DIR)
    if export_to is not None:
        export_vq(model, export_to)
    return model


def _log_eval(model, log_path: Path, step: int) -> dict:
    result = evaluate_roundtrip(model)
    record = {"step": step, "roundtrip_overall": result["overall"], "per_category": result["per_category"],
              "mean_abs_error": result["mean_abs_error"], "codes_used": result["codes_used"]}
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    model.train()
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgtq.training.train_vq", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="run directory (checkpoints, log.jsonl, final/)")
    parser.add_argument("--steps", type=int, default=VQTrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=VQTrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=VQTrainConfig.lr)
    parser.add_argument("--seed", type=int, default=VQTrainConfig.seed)
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--export", help="also save the final model here (diffusers layout)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=VQTrainConfig.checkpoint_every)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end at this step of the --steps schedule (the shipped VQ is step 1600 of 2500); "
                             "with --export, that model is exported")
    parser.add_argument("--eval-only", metavar="VQ_DIR",
                        help="only evaluate a saved VQ: ShapeBench round-trip scorer accuracy as JSON")
    args = parser.parse_args(argv)

    if args.eval_only:
        torch.set_num_threads(args.threads)
        result = evaluate_roundtrip(load_vq(args.eval_only))
        summary = {k: result[k] for k in ("overall", "per_category", "n", "ground_truth_overall",
                                          "mean_abs_error", "codes_used")}
        print(json.dumps(summary, indent=2))
        return 0
    if not args.out:
        parser.error("--out is required unless --eval-only is given")
    model = train_vq(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     resume=not args.no_resume, export_to=args.export, progress=not args.no_progress,
                     eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                     num_threads=args.threads, mixed_precision=args.mixed_precision, stop_after=args.stop_after)
    if args.stop_after is not None and args.export:
        export_vq(model.eval(), args.export)  # train_vq exports only finished schedules
    result = evaluate_roundtrip(model)
    print(json.dumps({"roundtrip_overall": result["overall"], "per_category": result["per_category"],
                      "ground_truth_overall": result["ground_truth_overall"],
                      "mean_abs_error": result["mean_abs_error"], "codes_used": result["codes_used"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
