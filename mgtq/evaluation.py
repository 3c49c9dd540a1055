"""ShapeBench evaluation of a pipeline: generate each prompt with its seed, score the pixels; and
ShapeBench-Edit (inpaint, replace, outpaint, img2img) through the editing pipelines.

What `mgtq eval` calls, and what the quality tables of SCQ, TomeMGT and the sampler ablations use.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from mgtq.pipeline import MGTPipeline
from mgtq.quantization.kernels import describe_kernels, kernels_label
from mgtq.sampling import SamplerConfig
from mgtq.shapes import evaluate, shapebench_prompts
from mgtq.shapes.scorer import ScorerConfig
from mgtq.shapes.shapebench import DEFAULT_PER_CATEGORY


def generate_shapebench(
    pipe: MGTPipeline, limit: int | None = None, sampler: SamplerConfig | None = None, batch_size: int = 16,
    progress: bool = True, per_category: int | None = None, seed_offset: int = 0, split: str = "test",
    start: int = 0, **call_kwargs,
) -> tuple[list, torch.Tensor, list, int]:
    """Generate the ShapeBench images (each with its prompt's seed). Returns (items, tokens, images, NFE).

    `limit` keeps the first `limit` prompts of an interleaved order, so small limits still cover
    every category. `seed_offset` shifts every seed: another draw of the same prompts, to measure
    how much of a difference between two models is sampling noise. `split="val"` draws other seeds and
    scenes (captions repeat across splits: the grammar has few), for choosing settings without touching
    the reported ones; `start` skips each category's first prompts (shapebench_prompts).
    """
    items = shapebench_prompts(per_category or DEFAULT_PER_CATEGORY, split, start)
    items = interleave_categories(items)[:limit] if limit else interleave_categories(items)
    tokens, images, cost = [], [], {}
    for start in tqdm(range(0, len(items), batch_size), desc="ShapeBench", disable=not progress):
        chunk = items[start : start + batch_size]
        out = pipe([it.prompt for it in chunk], seed=[it.seed + seed_offset for it in chunk], sampler=sampler,
                   progress=False, **call_kwargs)
        tokens.append(out.tokens.cpu())
        images += out.images
        cost = _cost(out)  # per image: every sample of a batch takes the same transformer calls
    return items, torch.cat(tokens), images, cost


def _cost(out) -> dict:
    """A call's transformer calls per image: all of them (nfe), context reuse's local steps among them, and the
    calls counted by the image tokens they computed (token_nfe)."""
    return {"nfe": out.nfe, "local_nfe": out.local_nfe, "token_nfe": out.token_nfe}


def _what_ran(pipe: MGTPipeline, config: SamplerConfig, call_kwargs: dict, batch_size: int) -> dict:
    """What a result was made with, to make it again: the model (its folder, None for one built in memory), mgtq's
    version, the sampler's settings, TomeMGT's (None: no merging), the kernels, the batch size (a batch of
    another size can turn a rare near-tie; README "Use it like diffusers") and the scorer's settings."""
    from mgtq import __version__

    merging = pipe.token_merging_config(call_kwargs.get("token_merging"))
    return {"model": pipe.name_or_path or None, "mgtq_version": __version__, "sampler": config.to_dict(),
            "token_merging": None if merging is None else asdict(merging), "kernels": describe_kernels(pipe.device),
            "batch_size": batch_size, "scorer": asdict(ScorerConfig())}


def evaluate_pipeline(
    pipe: MGTPipeline, limit: int | None = None, sampler: SamplerConfig | None = None, batch_size: int = 16,
    progress: bool = True, reference_tokens: torch.Tensor | None = None, seed_offset: int = 0, split: str = "test",
    per_category: int | None = None, start: int = 0, **call_kwargs,
) -> dict:
    """ShapeBench accuracy: {"overall", "per_category", "n", "nfe", "local_nfe", "token_nfe", "sampler",
    "token_merging", "seconds", "kernels", "model", "mgtq_version", "batch_size", "scorer", "seed_offset",
    "per_prompt", ...}; each per_prompt row's "image_seed" is its prompt's seed + seed_offset.

    "kernels": what ran it (``describe_kernels``), since a quantized model's score follows its kernels.
    With `reference_tokens` (from another model at the same seeds), also the token agreement: the
    fraction of token positions equal to the reference.
    """
    config = sampler or pipe.settings.sampler
    t0 = time.perf_counter()
    items, tokens, images, cost = generate_shapebench(pipe, limit, config, batch_size, progress, per_category,
                                                      seed_offset=seed_offset, split=split, start=start,
                                                      **call_kwargs)
    result = evaluate(images, items)
    result.update(split=split, **cost, seconds=time.perf_counter() - t0,
                  **_what_ran(pipe, config, call_kwargs, batch_size), seed_offset=seed_offset, start=start)
    for row in result["per_prompt"]:  # "seed" is the prompt's (its scene's); the image was drawn with this one
        row["image_seed"] = row["seed"] + seed_offset
    result["tokens"] = tokens
    if reference_tokens is not None:
        if reference_tokens.shape != tokens.shape:
            raise ValueError(f"reference tokens {tuple(reference_tokens.shape)} ≠ generated {tuple(tokens.shape)}")
        result["token_agreement"] = (reference_tokens == tokens).float().mean().item()
    return result


def evaluate_editing(
    pipe: MGTPipeline, task: str, limit: int | None = None, sampler: SamplerConfig | None = None,
    batch_size: int = 16, progress: bool = True, split: str = "test", per_task: int | None = None, **call_kwargs,
) -> dict:
    """ShapeBench-Edit accuracy of one task (mgtq.shapes.edit): the ShapeBench result dict plus "task",
    "preserved" and, for img2img, "per_strength".

    preserved: the fraction of tokens outside the mask equal to the encoded input's (inpaint, replace,
    outpaint: exactly 1.0, or the sampler changed a fixed token; None for img2img, which has no mask).
    `limit` keeps the first items (img2img: both strengths of each scene count as two).
    """
    from mgtq.editing import MGTImg2ImgPipeline, MGTInpaintPipeline, token_mask
    from mgtq.shapes.edit import DEFAULT_PER_TASK, edit_inputs, shapebench_edit_items

    config = sampler or pipe.settings.sampler
    items = shapebench_edit_items(task, per_task or DEFAULT_PER_TASK, split)[:limit]
    inpaint, img2img = MGTInpaintPipeline.from_pipe(pipe), MGTImg2ImgPipeline.from_pipe(pipe)
    t0 = time.perf_counter()
    outputs: dict[int, object] = {}
    kept = total = 0
    groups: dict[float | None, list[int]] = {}
    for i, item in enumerate(items):  # one pipeline call takes one strength
        groups.setdefault(item.strength, []).append(i)
    chunks = [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
    cost: dict = {}
    for chunk in tqdm(chunks, desc=f"ShapeBench-Edit {task}", disable=not progress):
        chunk_items = [items[i] for i in chunk]
        inputs = [edit_inputs(it) for it in chunk_items]
        kwargs = dict(seed=[it.seed for it in chunk_items], sampler=config, progress=False, **call_kwargs)
        images = [image for image, _ in inputs]
        if task == "img2img":
            out = img2img([it.prompt for it in chunk_items], image=images, strength=chunk_items[0].strength, **kwargs)
        else:
            masks = [mask for _, mask in inputs]
            out = inpaint([it.prompt for it in chunk_items], image=images, mask_image=masks, **kwargs)
            keep = ~torch.stack([token_mask(m, inpaint.vae_scale_factor) for m in masks])
            encoded = inpaint.encode_image(images).cpu()
            kept += int((out.tokens.cpu() == encoded)[keep].sum())
            total += int(keep.sum())
        outputs.update({i: image for i, image in zip(chunk, out.images)})
        cost = max(cost, _cost(out), key=lambda c: c.get("nfe", 0))  # the costliest strength's
    result = evaluate([outputs[i] for i in range(len(items))], items)
    result.update(task=task, split=split, **cost, seconds=time.perf_counter() - t0,
                  **_what_ran(pipe, config, call_kwargs, batch_size), preserved=kept / total if total else None)
    for row, item in zip(result["per_prompt"], items):
        row["strength"] = item.strength
    if task == "img2img":
        by_strength: dict[float, list[bool]] = {}
        for row in result["per_prompt"]:
            by_strength.setdefault(row["strength"], []).append(row["ok"])
        result["per_strength"] = {str(k): sum(v) / len(v) for k, v in by_strength.items()}
    return result


def edit_summary_line(result: dict) -> str:
    split = "" if result.get("split", "test") == "test" else f" [{result['split']} split]"
    extra = "".join(f"  strength {k}={v:.3f}" for k, v in result.get("per_strength", {}).items())
    kept = "" if result["preserved"] is None else f"  unmasked tokens kept={result['preserved']:.4f}"
    return (f"ShapeBench-Edit {result['task']}{split} accuracy={result['overall']:.3f} (n={result['n']}, "
            f"NFE ≤ {result['nfe']}{_accelerated(result)}){kept}{extra}")


def _accelerated(result: dict) -> str:
    """", 8 local, TomeMGT 0.5": what made a result's calls cheaper than full ones (results of earlier runs lack it)."""
    local = f", {result['local_nfe']} local" if result.get("local_nfe") else ""
    merging = result.get("token_merging")
    return local + (f", TomeMGT {merging['ratio']}" if merging else "")


def interleave_categories(items: list) -> list:
    """Round-robin over categories, so the first k prompts are balanced."""
    by_cat: dict[str, list] = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    out, queues = [], list(by_cat.values())
    for i in range(max(len(q) for q in queues)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def summary_line(result: dict) -> str:
    cats = "  ".join(f"{c}={v:.3f}" for c, v in result["per_category"].items())
    split = "" if result.get("split", "test") == "test" else f" [{result['split']} split]"
    ran = f"\n  on {kernels_label(result['kernels'])}" if "kernels" in result else ""
    return (f"ShapeBench{split} overall={result['overall']:.3f} (n={result['n']}, NFE {result['nfe']}"
            f"{_accelerated(result)})  {cats}{ran}")
