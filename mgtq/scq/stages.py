"""The four stages of SCQ (paper arXiv 2411.10781 §4.1): synthesize → QAT → magnitudes → secondary.

Each stage writes one folder of the run atomically, with a `stage.json` holding the fingerprint of
everything it depends on; a stage whose folder is complete with the same fingerprint is skipped,
so an interrupted `mgtq calibrate` resumes where it stopped (QAT also resumes mid-stage from its
periodic state).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mgtq.models.transformer import MeissonicTransformer, plain_config
from mgtq.pipeline import MGTPipeline
from mgtq.quantization import (
    FakeQuantLinear,
    calibrate_activations,
    input_scales_from_stats,
    linear_names,
    prepare_qat_,
)
from mgtq.sampling import SamplerConfig
from mgtq.sampling.schedules import timestep_for_mask_ratio
from mgtq.scq.recipe import Recipe
from mgtq.training.objective import mask_tokens, masked_distillation_loss, masked_token_loss
from mgtq.utils import atomic_directory, read_json, write_json

STAGES = ("synth", "qat", "magnitudes", "secondary")


# ------------------------------------------------------------------------------ stage bookkeeping
def stage_complete(folder: Path, fingerprint: str) -> bool:
    marker = folder / "stage.json"
    if not marker.exists():
        return False
    try:
        return read_json(marker).get("fingerprint") == fingerprint
    except ValueError:
        return False  # a damaged marker means the stage must run again


def stage_fingerprints(recipe: Recipe, model_fingerprint: str) -> dict[str, str]:
    """Each stage's fingerprint chains the ones before it, so a change re-runs everything after it."""
    fps, prev = {}, model_fingerprint
    sections = {"synth": ("prompts", "synthesis"), "qat": ("qat",), "magnitudes": ("magnitudes",),
                "secondary": ("secondary",)}
    for stage in STAGES:
        prev = hashlib.sha256((prev + recipe.section_fingerprint(*sections[stage])).encode()).hexdigest()[:16]
        fps[stage] = prev
    return fps


# ------------------------------------------------------------------------------------ 1. synthesize
def calibration_prompts(recipe: Recipe) -> list[tuple[str, int]]:
    """(prompt, seed) pairs: prompt i is generated with seed `prompts.seed + i`."""
    cfg = recipe.prompts
    if cfg.source == "shapebench":
        from mgtq.evaluation import interleave_categories
        from mgtq.shapes import shapebench_prompts

        per_cat = -(-cfg.count // 5)
        # The val split: calibrating on the prompts Table 3 is scored on would flatter SCQ.
        texts = [it.prompt for it in interleave_categories(shapebench_prompts(per_cat, split="val"))][: cfg.count]
    elif cfg.source == "grammar":
        from mgtq.shapes import caption, sample_scene

        # Seeds far from ShapeBench's so the calibration scenes are not benchmark scenes.
        texts = [caption(sample_scene(7_000_000_000 + cfg.seed + i)) for i in range(cfg.count)]
    else:
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts.file {path} does not exist")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"prompts.file {path} has no prompts")
        texts = [lines[i % len(lines)] for i in range(cfg.count)]
    return [(t, cfg.seed + i) for i, t in enumerate(texts)]


def synthesis_sampler(recipe: Recipe, pipe: MGTPipeline) -> SamplerConfig:
    s = recipe.synthesis
    return pipe.settings.sampler.replace(num_steps=s.num_steps, guidance_scale=s.guidance_scale)


def run_synthesize(recipe: Recipe, pipe: MGTPipeline, out: Path, fingerprint: str, progress: bool = True) -> None:
    """The float model draws its own calibration set → `datasets` Dataset (prompt, seed, image, tokens)."""
    from datasets import Dataset, Features, Image, Sequence, Value

    pairs = calibration_prompts(recipe)
    sampler = synthesis_sampler(recipe, pipe)
    res = recipe.synthesis.resolution or pipe.settings.resolution
    rows = {"prompt": [], "seed": [], "image": [], "tokens": []}
    bs = recipe.synthesis.batch_size
    for start in tqdm(range(0, len(pairs), bs), desc="SCQ 1/4 synthesize", disable=not progress):
        chunk = pairs[start : start + bs]
        result = pipe([p for p, _ in chunk], seed=[s for _, s in chunk], sampler=sampler, height=res, width=res,
                      progress=False)
        rows["prompt"] += [p for p, _ in chunk]
        rows["seed"] += [s for _, s in chunk]
        rows["image"] += result.images
        rows["tokens"] += result.tokens.flatten(1).tolist()
    features = Features({"prompt": Value("string"), "seed": Value("int64"), "image": Image(),
                         "tokens": Sequence(Value("int32"))})
    ds = Dataset.from_dict(rows, features=features)
    grid = list(pipe.token_grid(res, res))
    with atomic_directory(out) as tmp:
        ds.save_to_disk(str(tmp / "dataset"))
        write_json(tmp / "stage.json", {"fingerprint": fingerprint, "count": len(pairs), "token_grid": grid,
                                        "sampler": sampler.to_dict(), "resolution": res})


@dataclass
class CalibrationData:
    """Synthesized tokens (S, h, w) with text features of their prompts and of the empty prompt."""

    tokens: torch.Tensor
    text: torch.Tensor  # (S, L, C)
    pooled: torch.Tensor  # (S, P)
    uncond_text: torch.Tensor  # (1, L, C)
    uncond_pooled: torch.Tensor  # (1, P)
    micro_conds: torch.Tensor  # (1, 5)


def load_calibration_data(synth_dir: Path, pipe: MGTPipeline) -> CalibrationData:
    from datasets import load_from_disk

    meta = read_json(synth_dir / "stage.json")
    try:
        ds = load_from_disk(str(synth_dir / "dataset"))
    except Exception as err:  # datasets raises several types for damaged folders
        raise ValueError(f"the synthesized calibration set in {synth_dir} is damaged ({err}); delete that folder "
                         "and run `mgtq calibrate` again to re-synthesize it") from err
    h, w = meta["token_grid"]
    tokens = torch.tensor(ds["tokens"], dtype=torch.long).view(-1, h, w)
    with torch.inference_mode():
        text, pooled = pipe.encode_prompt(list(ds["prompt"]))
        utext, upooled = pipe.encode_prompt([""])
    res = meta["resolution"]
    micro = torch.tensor([[res, res, 0, 0, pipe.settings.aesthetic_score]], dtype=torch.float32)
    return CalibrationData(tokens, text.float().clone(), pooled.float().clone(), utext.float().clone(),
                           upooled.float().clone(), micro)


# ------------------------------------------------------------------------------------------- 2. QAT
def _conditioning(data: CalibrationData, idx: torch.Tensor, drop: torch.Tensor):
    text = torch.where(drop[:, None, None], data.uncond_text.expand(len(idx), -1, -1), data.text[idx])
    pooled = torch.where(drop[:, None], data.uncond_pooled.expand(len(idx), -1), data.pooled[idx])
    return text, pooled


# Which loss terms each qat.objective sums; "kl_to_float" is the distillation term.
OBJECTIVE_TERMS = {"ce": ("ce",), "distill": ("kl_to_float",), "ce+distill": ("ce", "kl_to_float")}


def qat_terms(model, data: CalibrationData, idx, drop, generator, sampler: SamplerConfig, device,
              terms=("ce",), teacher: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Loss terms on synthesized tokens from one student forward, timesteps in the sampler's convention.

    "ce" is the masked-token cross-entropy on the synthesized tokens; "kl_to_float" needs `teacher`,
    the float transformer, run on the same masked inputs.
    """
    if "kl_to_float" in terms and teacher is None:
        raise ValueError("the distillation term needs the float teacher model (qat.objective distill or ce+distill)")
    tokens = data.tokens[idx].to(device)
    text, pooled = _conditioning(data, idx, drop)
    transformer = model.module if hasattr(model, "module") else model
    masked, mask, ratio = mask_tokens(tokens, transformer.mask_token_id, generator)
    timestep = timestep_for_mask_ratio(sampler.timestep_convention, ratio, sampler.num_steps, sampler.schedule,
                                       sampler.rho)
    inputs = dict(hidden_states=masked, encoder_hidden_states=text.to(device), pooled_projections=pooled.to(device),
                  timestep=torch.as_tensor(timestep, device=device),
                  micro_conds=data.micro_conds.to(device).expand(len(idx), 5))
    logits = model(**inputs)
    out = {}
    if "ce" in terms:
        out["ce"] = masked_token_loss(logits, tokens, mask)
    if "kl_to_float" in terms:
        with torch.no_grad():
            teacher_logits = teacher(**inputs)
        out["kl_to_float"] = masked_distillation_loss(logits, teacher_logits, mask)
    return out


def qat_loss(model, data: CalibrationData, idx, drop, generator, sampler: SamplerConfig, device,
             objective: str = "ce", teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """The QAT objective (see QATConfig.objective): the sum of its terms from :func:`qat_terms`."""
    return sum(qat_terms(model, data, idx, drop, generator, sampler, device, OBJECTIVE_TERMS[objective],
                         teacher).values())


def fixed_eval_metrics(model, data: CalibrationData, sampler: SamplerConfig, device, n: int = 64, seed: int = 1234,
                       teacher: torch.nn.Module | None = None) -> dict[str, float]:
    """CE (the fit to the calibration set) and, given the float `teacher`, the KL to it, on a fixed set
    of masks (the same every call), from one student forward."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, data.tokens.shape[0], (n,), generator=gen)
    terms = ("ce",) if teacher is None else ("ce", "kl_to_float")
    with torch.no_grad():
        values = qat_terms(model, data, idx, torch.zeros(n, dtype=torch.bool), gen, sampler, device, terms, teacher)
    return {k: float(v) for k, v in values.items()}


def float_state_dict(model: torch.nn.Module, reference_keys) -> dict[str, torch.Tensor]:
    """The float (latent) weights of a fake-quant model, under the plain model's keys."""
    sd = model.state_dict()
    missing = set(reference_keys) - set(sd)
    if missing:
        raise RuntimeError(f"QAT model lost parameters: {sorted(missing)[:5]}")
    return {k: sd[k].detach().contiguous().cpu() for k in reference_keys}


def run_qat(recipe: Recipe, pipe: MGTPipeline, data: CalibrationData, out: Path, state_dir: Path,
            fingerprint: str, progress: bool = True) -> None:
    """Fake-quant int4 weights (STE), trained on the synthesized tokens; resumable; NaN-guarded."""
    from accelerate import Accelerator

    cfg = recipe.qat
    sampler = synthesis_sampler(recipe, pipe)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation)
    transformer = pipe.transformer.float().train()
    reference_keys = list(transformer.state_dict().keys())
    # The float model, frozen: the distillation teacher, and the yardstick of how far QAT drifts from it.
    # Only distillation pays for this second copy (a 1B-parameter model's is 4 GB in fp32).
    teacher = copy.deepcopy(transformer).eval().requires_grad_(False) if cfg.objective != "ce" else None
    prepare_qat_(transformer, group_size=cfg.group_size, skip=cfg.skip)
    for p in transformer.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    device = accelerator.device
    if teacher is not None:
        teacher.to(device)

    def fixed_metrics(m) -> dict:
        return fixed_eval_metrics(m, data, sampler, device, teacher=teacher)

    loss_before = fixed_metrics(model)
    start = 0
    if (state_dir / "trainer.json").exists() and read_json(state_dir / "trainer.json").get("fingerprint") == fingerprint:
        accelerator.load_state(str(state_dir))
        start = read_json(state_dir / "trainer.json")["step"]
        loss_before = read_json(state_dir / "trainer.json")["loss_before"]
    losses = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="SCQ 2/4 QAT",
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        for micro in range(cfg.gradient_accumulation):
            # Per process, step and micro-batch: reproducible after a resume, distinct across processes.
            gen = torch.Generator().manual_seed(hash((cfg.seed, step, micro, accelerator.process_index)) % 2**62)
            idx = torch.randint(0, data.tokens.shape[0], (cfg.batch_size,), generator=gen)
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop
            with accelerator.accumulate(model):
                loss = qat_loss(model, data, idx, drop, gen, sampler, device, cfg.objective, teacher)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"QAT loss became {loss.item()} at step {step}; stopped. The last good state is kept in "
                        f"{state_dir}; lower qat.lr in the recipe and run `mgtq calibrate` again to resume")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with atomic_directory(state_dir) as tmp:
                    accelerator.save_state(str(tmp), safe_serialization=True)
                    write_json(tmp / "trainer.json", {"step": step + 1, "fingerprint": fingerprint,
                                                      "loss_before": loss_before})
            accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    loss_after = fixed_metrics(unwrapped)
    if accelerator.is_main_process:
        weights = float_state_dict(unwrapped, reference_keys)
        with atomic_directory(out) as tmp:
            _save_float_transformer(pipe.transformer.config, weights, tmp / "transformer")
            write_json(tmp / "stage.json", {
                "fingerprint": fingerprint, "steps": cfg.steps, "processes": accelerator.num_processes,
                "objective": cfg.objective,
                "loss_before": loss_before, "loss_after": loss_after,
                "train_loss_last": float(np.mean(losses[-10:])) if losses else None,
                "group_size": cfg.group_size, "skip": list(cfg.skip),
            })
    accelerator.wait_for_everyone()


def _save_float_transformer(config, weights: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(plain_config(config), indent=2))


def load_qat_transformer(qat_dir: Path, recipe: Recipe) -> MeissonicTransformer:
    """The QAT weights with the same W4 fake quant as in training (the model SCQ measures and calibrates)."""
    try:
        model = MeissonicTransformer.from_pretrained(qat_dir / "transformer", local_files_only=True).float().eval()
    except Exception as err:
        raise ValueError(f"the QAT weights in {qat_dir} are damaged ({str(err)[:200]}); delete {qat_dir} and run "
                         "`mgtq calibrate` again") from err
    prepare_qat_(model, group_size=recipe.qat.group_size, skip=recipe.qat.skip)
    return model


# ------------------------------------------------------------------------------------ 3. magnitudes
def calibration_batches(n_samples: int, grid_size: int, recipe: Recipe, seed: int = 0):
    """(sample indices, mask (b, h·w) bool, masked fraction) over the calibration set × mask ratios."""
    cfg = recipe.magnitudes
    n = n_samples if cfg.max_samples is None else min(cfg.max_samples, n_samples)
    gen = torch.Generator().manual_seed(seed)
    for ratio in cfg.mask_ratios:
        k = max(1, round(ratio * grid_size))
        for start in range(0, n, cfg.batch_size):
            idx = torch.arange(start, min(n, start + cfg.batch_size))
            ranks = torch.rand(len(idx), grid_size, generator=gen).argsort(1).argsort(1)
            yield idx, ranks < k, k / grid_size


def record_activation_stats(model: MeissonicTransformer, data: CalibrationData, recipe: Recipe,
                            sampler: SamplerConfig, names: list[str], progress: bool = True, desc: str = "calibration"):
    """Run the calibration inputs through `model` as the sampler would ([uncond, cond] batch) and
    record the input statistics of the Linear layers `names`."""
    grid = data.tokens[0].numel()
    batches = list(calibration_batches(data.tokens.shape[0], grid, recipe))
    with calibrate_activations(model, names) as stats, torch.inference_mode():
        for idx, mask, frac in tqdm(batches, desc=desc, disable=not progress):
            tokens = data.tokens[idx]
            inp = torch.where(mask.view_as(tokens), torch.full_like(tokens, model.mask_token_id), tokens)
            b = len(idx)
            t = timestep_for_mask_ratio(sampler.timestep_convention, frac, sampler.num_steps, sampler.schedule,
                                        sampler.rho)
            text = torch.cat([data.uncond_text.expand(b, -1, -1), data.text[idx]])
            pooled = torch.cat([data.uncond_pooled.expand(b, -1), data.pooled[idx]])
            model(hidden_states=torch.cat([inp, inp]), encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.full((2 * b,), float(t)), micro_conds=data.micro_conds.expand(2 * b, 5))
    return stats


def magnitude_of(stats, statistic: str, percentile: float) -> float:
    if statistic == "mean_abs":
        return stats.mean_abs
    if statistic == "absmax":
        return stats.absmax
    return stats.percentile(percentile)


def select_a8_layers(magnitudes: dict[str, float], fraction: float, selection: str, seed: int = 0) -> list[str]:
    """The layers that get int8 activations: SCQ takes the round(fraction·L) of lowest magnitude.

    "random" draws as many at random (the paper's ablation); "all" takes every layer.
    """
    names = sorted(magnitudes)
    if selection == "all":
        return names
    k = round(fraction * len(names))
    if selection == "random":
        return sorted(random.Random(seed).sample(names, k))
    if selection == "lowest":
        return sorted(sorted(names, key=lambda n: (magnitudes[n], n))[:k])
    raise ValueError(f"unknown selection {selection!r}")


def run_magnitudes(recipe: Recipe, pipe: MGTPipeline, data: CalibrationData, qat_dir: Path, out: Path,
                   fingerprint: str, progress: bool = True) -> None:
    """Per-Linear input magnitude of the QAT model (W4 fake quant on), over data × timesteps."""
    cfg = recipe.magnitudes
    model = load_qat_transformer(qat_dir, recipe)
    names = linear_names(model, recipe.qat.skip)
    stats = record_activation_stats(model, data, recipe, synthesis_sampler(recipe, pipe), names, progress,
                                    desc="SCQ 3/4 magnitudes")
    table = {n: {"mean_abs": s.mean_abs, "absmax": s.absmax, f"p{cfg.percentile:g}": s.percentile(cfg.percentile)}
             for n, s in stats.items()}
    chosen = {n: magnitude_of(stats[n], cfg.statistic, cfg.percentile) for n in names}
    bad = [n for n, v in chosen.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite activations at {bad[:3]}; the QAT weights are unusable — lower qat.lr")
    with atomic_directory(out) as tmp:
        write_json(tmp / "magnitudes.json", {"statistic": cfg.statistic, "magnitude": chosen, "stats": table})
        write_json(tmp / "stage.json", {"fingerprint": fingerprint, "layers": len(names)})


def plot_magnitudes(magnitudes: dict[str, float], a8: list[str], statistic: str, path: Path) -> None:
    """Sorted per-layer magnitudes (log scale), the A8 set highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(magnitudes, key=lambda n: magnitudes[n])
    values = [magnitudes[n] for n in names]
    colours = ["tab:orange" if n in set(a8) else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    ax.bar(range(len(names)), values, color=colours, width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel(f"transformer Linear layers, sorted by input {statistic}")
    ax.set_ylabel(f"input {statistic}")
    ax.set_title(f"SCQ activation magnitudes — orange: int8 activations ({len(a8)} of {len(names)} layers)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------------- 4. secondary
def run_secondary(recipe: Recipe, pipe: MGTPipeline, data: CalibrationData, qat_dir: Path, magnitudes_dir: Path,
                  out: Path, fingerprint: str, progress: bool = True) -> None:
    """Keep the QAT weights, choose the A8 set, calibrate static per-tensor int8 scales for it."""
    cfg = recipe.secondary
    magnitudes = read_json(magnitudes_dir / "magnitudes.json")["magnitude"]
    a8 = select_a8_layers(magnitudes, cfg.fraction, cfg.selection, cfg.seed)
    model = load_qat_transformer(qat_dir, recipe)
    sampler = synthesis_sampler(recipe, pipe)
    # A8 layers use per-channel int4 weights (the int GEMM rescales per output column): give them that
    # grid now, so the calibration sees exactly the weights that will be exported.
    for name in a8:
        _set_per_channel(model, name)
    scales = {}
    if a8:
        stats = record_activation_stats(model, data, recipe, sampler, a8, progress, desc="SCQ 4/4 secondary")
        scales = {n: float(s) for n, s in input_scales_from_stats(stats, cfg.scale_method, cfg.percentile).items()}
        for name, scale in scales.items():
            model.get_submodule(name).set_input_scale(scale)
    loss = fixed_eval_metrics(model, data, sampler, "cpu")["ce"]
    with atomic_directory(out) as tmp:
        write_json(tmp / "selection.json", {"selection": cfg.selection, "fraction": cfg.fraction, "a8_layers": a8,
                                            "input_scales": scales, "magnitude_statistic": recipe.magnitudes.statistic})
        plot_magnitudes(magnitudes, a8, recipe.magnitudes.statistic, tmp / "magnitudes.png")
        write_json(tmp / "stage.json", {"fingerprint": fingerprint, "a8_layers": len(a8), "layers": len(magnitudes),
                                        "loss_w4a8_fake_quant": loss})


def _set_per_channel(model: torch.nn.Module, name: str) -> None:
    layer = model.get_submodule(name)
    if not isinstance(layer, FakeQuantLinear):
        raise TypeError(f"{name} is not a fake-quant layer")
    if layer.group_size != layer.in_features:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, FakeQuantLinear.from_linear(layer, None))
