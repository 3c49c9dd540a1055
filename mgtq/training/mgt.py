"""Train mgtq's embedded default: a tiny Meissonic-architecture MGT and its CLIP text encoder.

The shapes world (mgtq.shapes) renders captioned scenes; the trained VQ tokenizer turns them into
16×16 token grids once (a `datasets` Dataset cached in the run folder); then the text encoder
(`CLIPTextModelWithProjection`, trained from scratch jointly, with a tokenizer spelling the grammar's
words) and the `MeissonicTransformer` learn the masked-token objective of mgtq.training.objective
with the "mask_ratio" timestep convention that the sampler uses. Runs on accelerate; resumable from
the run folder; the final pipeline is written in diffusers layout.

    python -m mgtq.training.mgt --vq checkpoints/tiny-shapes/vqvae --run runs/mgt --out checkpoints/tiny-shapes
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import VQModel
from tqdm.auto import tqdm

from mgtq.files import atomic_directory, read_json, write_json
from mgtq.models.random import tiny_text_encoder
from mgtq.models.presets import preset_config
from mgtq.models.transformer import MeissonicTransformer
from mgtq.pipeline import MGTPipeline, PipelineSettings, micro_conditions
from mgtq.sampling import SamplerConfig
from mgtq.text import build_word_tokenizer
from mgtq.config import from_mapping, read_mapping, validate
from mgtq.training import loop
from mgtq.training.objective import mask_tokens, masked_token_loss
from mgtq.training.state import keeps_global_rng
from mgtq.vq import load_vq

IMAGE_SIZE = 64


@dataclass(frozen=True)
class MGTTrainConfig:
    """Training settings of the default model. Transformer overrides go on top of the preset."""

    transformer_preset: str = "tiny-shapes"
    transformer_overrides: dict[str, Any] = field(default_factory=dict)
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 32
    dataset_size: int = 60_000
    steps: int = 12_000
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 300
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    cond_drop: float = 0.1  # empty caption this often, so CFG has an unconditional model
    grad_clip: float = 1.0
    save_every: int = 500
    seed: int = 0
    sampler_steps: int = 16
    guidance_scale: float = 3.0
    init_from: str | None = None  # warm start: a pipeline folder whose transformer/text encoder to continue
    # Relative frequency of each scene category in the training data (None: uniform, as the world
    # draws it). Lets a stage spend its steps on what the model still gets wrong (attribute binding
    # and relations) instead of what it already draws.
    category_weights: dict[str, float] | None = None

    def __post_init__(self):
        validate(self)
        for name in ("steps", "batch_size", "dataset_size", "save_every", "text_layers", "text_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 <= self.cond_drop < 1:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.category_weights is not None:
            category_probabilities(self.category_weights)  # validates


def category_probabilities(weights: dict) -> np.ndarray:
    """Weights by category name → probabilities in CATEGORIES order (missing categories get 0)."""
    from mgtq.shapes.world import CATEGORIES

    unknown = sorted(set(weights) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"category_weights has unknown categories {unknown}; expected names from {CATEGORIES}")
    w = np.array([float(weights.get(c, 0.0)) for c in CATEGORIES])
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"category_weights must be finite, ≥ 0 and not all 0, got {weights}")
    return w / w.sum()


# -------------------------------------------------------------------------------------------- data
def training_scene(index: int, seed: int, category_weights: dict | None = None):
    """Scene `index` of the data drawn with `seed`: from (seed + 1)·10⁹ + index, far from ShapeBench seeds.

    Without weights the world draws the category uniformly; with them the category is drawn first
    from the same generator, so the unweighted draw stays what it always was for a given seed.
    """
    from mgtq.shapes.world import CATEGORIES, sample_scene

    rng = np.random.default_rng((seed + 1) * 1_000_000_000 + index)
    if category_weights is None:
        return sample_scene(rng)
    category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=category_probabilities(category_weights)))]
    return sample_scene(rng, category)


def build_token_dataset(vq: VQModel, size: int, seed: int, batch_size: int = 256,
                        category_weights: dict | None = None):
    """Render `size` training scenes (:func:`training_scene`) and VQ-encode them.

    Returns a `datasets.Dataset` with columns caption (str) and tokens (list of h·w ints).
    """
    from datasets import Dataset

    from mgtq.shapes.world import caption, render
    from mgtq.vq import encode_to_tokens

    captions, token_rows = [], []
    for start in tqdm(range(0, size, batch_size), desc="encoding scenes"):
        scenes = [training_scene(i, seed, category_weights) for i in range(start, min(size, start + batch_size))]
        images = np.stack([render(s) for s in scenes])  # (B, 64, 64, 3) uint8
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            tokens = encode_to_tokens(vq, x)
        captions += [caption(s) for s in scenes]
        token_rows += tokens.flatten(1).tolist()
    return Dataset.from_dict({"caption": captions, "tokens": token_rows})


def load_or_build_dataset(run: Path, vq: VQModel, config: MGTTrainConfig):
    from datasets import load_from_disk

    data_dir = run / "data"
    meta = {"size": config.dataset_size, "seed": config.seed}
    if config.category_weights is not None:  # only then, so caches of unweighted runs stay valid
        meta["category_weights"] = config.category_weights
    if data_dir.exists() and (run / "data.json").exists() and read_json(run / "data.json") == meta:
        return load_from_disk(str(data_dir))
    ds = build_token_dataset(vq, config.dataset_size, config.seed, category_weights=config.category_weights)
    with atomic_directory(data_dir) as tmp:
        ds.save_to_disk(str(tmp))
    write_json(run / "data.json", meta)
    return load_from_disk(str(data_dir))


# ------------------------------------------------------------------------------------------ models
def build_models(config: MGTTrainConfig, tokenizer, codebook_size: int):
    tconf = preset_config(config.transformer_preset, **config.transformer_overrides)
    tconf["codebook_size"] = codebook_size
    tconf["vocab_size"] = codebook_size + 8  # ids ≥ codebook are special; the last is [MASK]
    transformer = MeissonicTransformer(**tconf)
    text_encoder = tiny_text_encoder(tokenizer, tconf["joint_attention_dim"], tconf["pooled_projection_dim"],
                                     layers=config.text_layers, heads=config.text_heads)
    return transformer, text_encoder


def _warm_start(transformer, text_encoder, tokenizer, folder: Path) -> dict:
    """Continue from a trained pipeline: the same tokenizer vocabulary, and every weight of the new
    transformer present in the source with the same shape.

    The source may hold more: weights of a part the new layout drops (the feature-compression
    convolutions when a model without them starts from one with them). Returns which weights were
    reused and which were left behind, for the run record.
    """
    from mgtq.pipeline import MGTPipeline

    source = MGTPipeline.from_pretrained(folder)
    if source.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{folder} was trained with another tokenizer vocabulary; cannot warm-start from it")
    state, target = source.transformer.state_dict(), transformer.state_dict()
    missing = sorted(k for k in target if k not in state)
    mismatched = sorted(k for k in target if k in state and state[k].shape != target[k].shape)
    if missing or mismatched:
        raise ValueError(f"cannot warm-start from {folder}: its transformer lacks {missing[:5]} and has other shapes for "
                         f"{mismatched[:5]}; only a layout change that drops parts (feature compression) is supported")
    transformer.load_state_dict({k: state[k] for k in target})
    text_encoder.load_state_dict(source.text_encoder.state_dict())
    dropped = sorted(k for k in state if k not in target)
    return {"from": str(folder), "reused": len(target), "dropped": dropped}


def lr_at(step: int, config: MGTTrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio·lr (loop.warmup_cosine of the config's steps)."""
    return loop.warmup_cosine(step, config.steps, config.warmup, config.min_lr_ratio)


class _MaskedTokenLoss(torch.nn.Module):
    """Text encoder + transformer as one module whose forward is the training loss, so accelerate
    prepares and saves both together."""

    def __init__(self, transformer, text_encoder):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder

    def forward(self, ids, tokens, generator, micro_conds):
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=True)
        masked, mask, timestep = mask_tokens(tokens, self.transformer.mask_token_id, generator)
        logits = self.transformer(hidden_states=masked, encoder_hidden_states=out.hidden_states[-2],
                                  pooled_projections=out.text_embeds, timestep=timestep, micro_conds=micro_conds)
        return masked_token_loss(logits, tokens, mask)


# ---------------------------------------------------------------------------------------- training
@keeps_global_rng
def train_mgt(vq_path: str | Path, run: str | Path, out: str | Path | None, config: MGTTrainConfig,
              progress: bool = True) -> dict:
    """Train (or resume) in `run`; write the pipeline to `out` when done. Returns a summary."""
    from mgtq.shapes.world import vocabulary

    run, vq_path = Path(run), Path(vq_path)
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "config.json"
    if saved.exists() and read_json(saved) != _jsonable(config):
        raise ValueError(f"{run} was started with a different config ({saved}); use a new --run folder")
    write_json(saved, _jsonable(config))

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    vq = load_vq(vq_path)  # safetensors only, every tensor checked
    data = load_or_build_dataset(run, vq, config)
    all_tokens = torch.tensor(data["tokens"], dtype=torch.long)
    side = int(math.isqrt(all_tokens.shape[1]))
    all_tokens = all_tokens.view(-1, side, side)
    captions = list(data["caption"])

    tokenizer = build_word_tokenizer(vocabulary(), max_length=config.text_max_length)
    # module init draws from the CPU generator; seeding only it leaves the GPUs' streams as they were
    torch.default_generator.manual_seed(config.seed)
    transformer, text_encoder = build_models(config, tokenizer, vq.config.num_vq_embeddings)
    if config.init_from:
        write_json(run / "warm_start.json", _warm_start(transformer, text_encoder, tokenizer, Path(config.init_from)))
    joint = _MaskedTokenLoss(transformer, text_encoder)
    optimizer = torch.optim.AdamW(joint.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, config))
    joint, optimizer, scheduler = accelerator.prepare(joint, optimizer, scheduler)

    state_dir = run / "state"
    settings = loop.LoopSettings(steps=config.steps, save_every=config.save_every, grad_clip=config.grad_clip,
                                 save_final=True, desc="training MGT",
                                 nan_hint="lower lr in the config and run again to resume")
    start, saved = loop.resume(accelerator, state_dir, joint, optimizer, scheduler, settings=settings)
    micro = micro_conditions(IMAGE_SIZE, IMAGE_SIZE, device=accelerator.device)
    log_path = run / "log.jsonl"
    t0 = time.time() - _elapsed_before(log_path, start)  # elapsed_s counts training time over every resume

    def loss_fn(step: int, _micro: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # same batches after a resume
        idx = torch.randint(0, all_tokens.shape[0], (config.batch_size,), generator=gen)
        drop = torch.rand(config.batch_size, generator=gen) < config.cond_drop
        texts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        ids = tokenizer(texts, padding="max_length", max_length=config.text_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(accelerator.device)
        tokens = all_tokens[idx].to(accelerator.device)
        return joint(ids, tokens, gen, micro.expand(config.batch_size, 5))

    def log(step: int, losses: list[float]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "loss": float(np.mean(losses[-config.save_every:])),
                                "elapsed_s": time.time() - t0}) + "\n")

    losses = loop.train(accelerator, joint, optimizer, loss_fn, settings, state_dir, start, saved,
                        scheduler=scheduler, progress=progress, on_save=log)
    summary = {"steps": config.steps, "final_loss": float(np.mean(losses[-200:])) if losses else None}
    if out is not None:
        unwrapped = accelerator.unwrap_model(joint)
        export_pipeline(unwrapped.transformer, vq, unwrapped.text_encoder, tokenizer, config, out)
        summary["out"] = str(out)
    return summary


def _elapsed_before(log_path: Path, step: int) -> float:
    """Training seconds logged up to `step` (the saved state a resume continues from); 0 for a new run."""
    if step == 0 or not log_path.exists():
        return 0.0
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return max((e["elapsed_s"] for e in entries if e["step"] <= step), default=0.0)


def export_pipeline(transformer, vq, text_encoder, tokenizer, config: MGTTrainConfig, out) -> None:
    settings = PipelineSettings(
        sampler=SamplerConfig(num_steps=config.sampler_steps, guidance_scale=config.guidance_scale,
                              timestep_convention="mask_ratio"),
        resolution=IMAGE_SIZE, image_range="-1,1",
    )
    pipe = MGTPipeline(transformer.eval().float(), vq.eval(), text_encoder.eval().float(), tokenizer, settings)
    pipe.save_pretrained(out)


def _jsonable(config: MGTTrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vq", required=True, type=Path, help="trained VQModel folder")
    p.add_argument("--run", required=True, type=Path, help="run folder (state, data cache, log); resumed if present")
    p.add_argument("--out", type=Path, default=None, help="write the finished pipeline here")
    p.add_argument("--config", type=Path, default=None, help="JSON of MGTTrainConfig fields")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = read_mapping(args.config, f"--config {args.config}", fmt="json") if args.config else {}
    print(json.dumps(train_mgt(args.vq, args.run, args.out, from_mapping(MGTTrainConfig, fields, "config")), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
