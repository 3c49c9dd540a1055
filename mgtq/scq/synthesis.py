"""SCQ step 1 (paper §4.1): the float model synthesizes its own calibration set.

Prompt sources (ShapeBench's validation prompts, the shapes grammar, a text file), the synthesis
itself (the model's vanilla sampler → a `datasets` Dataset of prompt, seed, image (unless the recipe drops it),
tokens), and
`CalibrationData`: those tokens with the text features the later steps condition on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mgtq.files import atomic_directory, describe_path, read_json, remove_directory, write_json
from mgtq.hashing import files_fingerprint
from mgtq.pipeline import MGTPipeline, micro_conditions
from mgtq.sampling import SamplerConfig
from mgtq.scq.recipe import PromptsConfig, SynthesisConfig

# Seeds of grammar scenes: far from ShapeBench's, so the calibration scenes are not benchmark scenes.
GRAMMAR_SEED_OFFSET = 7_000_000_000


def calibration_prompts(cfg: PromptsConfig) -> list[tuple[str, int]]:
    """(prompt, seed) pairs: prompt i is generated with seed `cfg.seed + i`."""
    if cfg.source == "shapebench":
        from mgtq.evaluation import interleave_categories
        from mgtq.shapes import shapebench_prompts

        per_cat = -(-cfg.count // 5)
        # The val split: calibrating on the prompts Table 3 is scored on would flatter SCQ.
        texts = [it.prompt for it in interleave_categories(shapebench_prompts(per_cat, split="val"))][: cfg.count]
    elif cfg.source == "grammar":
        from mgtq.shapes import caption, sample_scene

        texts = [caption(sample_scene(GRAMMAR_SEED_OFFSET + cfg.seed + i)) for i in range(cfg.count)]
    else:
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts.file {path} {describe_path(path)}; give a text file, one prompt a line")
        try:
            lines = [ln.strip() for ln in path.read_bytes().decode("utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"prompts.file {path} is not UTF-8 text; save it as UTF-8") from None
        if not lines:
            raise ValueError(f"prompts.file {path} has no prompts")
        texts = [lines[i % len(lines)] for i in range(cfg.count)]
    return [(t, cfg.seed + i) for i, t in enumerate(texts)]


def synthesis_sampler(base: SamplerConfig, cfg: SynthesisConfig) -> SamplerConfig:
    """The model's own sampler settings with the recipe's steps and CFG scale."""
    return base.replace(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale)


# Prompts per shard of a synthesis in progress, rounded up to whole batches (so the batches, and the images, are
# the ones of an unsharded run): a killed run loses at most one shard's work, and holds one shard's rows in memory.
SHARD_PROMPTS = 64
SHARD_RECORD = "shard.json"
SHARD_ROWS = "rows"


def synthesize(pipe: MGTPipeline, pairs: list[tuple[str, int]], sampler: SamplerConfig, resolution: int,
               batch_size: int, progress: bool = True, desc: str = "synthesize", keep_images: bool = True,
               shards: Path | None = None, fingerprint: str = ""):
    """Generate one image per (prompt, seed) → `datasets.Dataset` (prompt, seed, image, tokens (h·w)); without
    `keep_images`, the tokens only (no VQ decoding, no image column).

    With `shards` (a folder), every `SHARD_PROMPTS` prompts are written there as they complete, and the shards a
    killed run left for the same `fingerprint` (the same prompts, sampler and model) are read back instead of
    sampled again; the set then reads its rows from those files, so the caller keeps the folder until it has
    saved the set elsewhere.
    """
    from datasets import Dataset, concatenate_datasets

    features = _features(keep_images)
    bar = tqdm(total=len(pairs), desc=desc, unit="image", disable=not progress)
    if shards is None:
        rows = _sample(pipe, pairs, sampler, resolution, batch_size, keep_images, bar)
        bar.close()
        return Dataset.from_dict(rows, features=features)
    size = batch_size * -(-SHARD_PROMPTS // batch_size)
    spans = [(start, min(start + size, len(pairs))) for start in range(0, len(pairs), size)]
    done = _resumable_shards(Path(shards), spans, pairs, fingerprint)
    bar.update(sum(len(ds) for ds in done))
    for start, end in spans[len(done):]:
        rows = _sample(pipe, pairs[start:end], sampler, resolution, batch_size, keep_images, bar)
        done.append(_write_shard(Path(shards) / _shard_name(start, end), Dataset.from_dict(rows, features=features),
                                 fingerprint))
    bar.close()
    return concatenate_datasets(done)


def _features(keep_images: bool):
    from datasets import Features, Image, Sequence, Value

    columns = {"prompt": Value("string"), "seed": Value("int64"), "image": Image(), "tokens": Sequence(Value("int32"))}
    if not keep_images:
        del columns["image"]
    return Features(columns)


def _sample(pipe: MGTPipeline, pairs: list[tuple[str, int]], sampler: SamplerConfig, resolution: int,
            batch_size: int, keep_images: bool, bar) -> dict[str, list]:
    """The rows of `pairs`, sampled `batch_size` at a time."""
    rows = {"prompt": [], "seed": [], **({"image": []} if keep_images else {}), "tokens": []}  # the columns' order
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        result = pipe([p for p, _ in chunk], seed=[s for _, s in chunk], sampler=sampler, height=resolution,
                      width=resolution, progress=False, output_type="pil" if keep_images else "latent")
        rows["prompt"] += [p for p, _ in chunk]
        rows["seed"] += [s for _, s in chunk]
        if keep_images:
            rows["image"] += result.images
        rows["tokens"] += result.tokens.flatten(1).tolist()
        bar.update(len(chunk))
    return rows


def _shard_name(start: int, end: int) -> str:
    return f"{start:07d}-{end:07d}"


def _write_shard(folder: Path, ds, fingerprint: str):
    """Write one shard atomically (its rows, then a record of what made them and of their files' digest); the
    shard as read back from there."""
    with atomic_directory(folder) as tmp:
        save_dataset(ds, tmp / SHARD_ROWS, progress=False)
        write_json(tmp / SHARD_RECORD, {"fingerprint": fingerprint, "rows": len(ds),
                                        "files": files_fingerprint({SHARD_ROWS: tmp / SHARD_ROWS})})
    return _load_rows(folder / SHARD_ROWS)


def _resumable_shards(folder: Path, spans: list[tuple[int, int]], pairs: list[tuple[str, int]],
                      fingerprint: str) -> list:
    """The shards in `folder` that a run with `fingerprint` can keep: the leading spans, each intact (its files as
    written, its prompts and seeds the ones planned). Everything else in the folder (a shard of other settings, a
    damaged one and those after it, a killed write's debris) is removed."""
    kept = []
    for start, end in spans:
        shard = folder / _shard_name(start, end)
        try:
            record = read_json(shard / SHARD_RECORD)
            intact = (record.get("fingerprint") == fingerprint and record.get("rows") == end - start
                      and record.get("files") == files_fingerprint({SHARD_ROWS: shard / SHARD_ROWS}))
            ds = _load_rows(shard / SHARD_ROWS) if intact else None
        except (OSError, ValueError):
            ds = None
        if ds is None or list(zip(ds["prompt"], ds["seed"])) != [tuple(p) for p in pairs[start:end]]:
            break
        kept.append(ds)
    keep = {_shard_name(*span) for span in spans[: len(kept)]}
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir():
                remove_directory(entry)
            else:
                entry.unlink()
    return kept


def _load_rows(path: Path):
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for damaged folders
        raise ValueError(f"{path}: {err}") from err


def save_dataset(ds, path: Path, progress: bool) -> None:
    """`ds.save_to_disk(path)`; its "Saving the dataset" bar obeys only datasets' global switch, so that switch
    is off for the call when `progress` is (`mgtq calibrate --no-progress` promises no bars)."""
    import datasets

    hide = not progress and not datasets.are_progress_bars_disabled()
    if hide:
        datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        if hide:
            datasets.enable_progress_bars()


@dataclass
class CalibrationData:
    """Synthesized tokens (S, h, w) with text features of their prompts and of the empty prompt."""

    tokens: torch.Tensor
    text: torch.Tensor  # (S, L, C)
    pooled: torch.Tensor  # (S, P)
    uncond_text: torch.Tensor  # (1, L, C)
    uncond_pooled: torch.Tensor  # (1, P)
    micro_conds: torch.Tensor  # (1, 5)


# Prompts encoded per text-encoder call: the device holds one chunk's activations and features, not the whole set's
# (each chunk's features go to the host as they come).
ENCODE_BATCH = 256


def calibration_data(dataset, pipe: MGTPipeline, token_grid: tuple[int, int], resolution: int) -> CalibrationData:
    """The synthesized `dataset` as tensors, its prompts encoded by `pipe`'s text encoder."""
    h, w = token_grid
    tokens = torch.tensor(dataset["tokens"], dtype=torch.long).view(-1, h, w)
    # fp32 copies on the host, as the tokens (ordinary tensors, not inference ones: QAT trains on them); each stage
    # moves what a batch needs to its model's device
    host = dict(device="cpu", dtype=torch.float32, copy=True)
    prompts, text, pooled = list(dataset["prompt"]), [], []
    with torch.inference_mode():
        for start in range(0, len(prompts), ENCODE_BATCH):
            t, p = pipe.encode_prompt(prompts[start : start + ENCODE_BATCH])
            text.append(t.to(**host))
            pooled.append(p.to(**host))
        utext, upooled = pipe.encode_prompt([""])
    micro = micro_conditions(resolution, resolution, pipe.settings.aesthetic_score)
    # joined and copied outside inference mode: ordinary tensors
    return CalibrationData(tokens, torch.cat(text), torch.cat(pooled), utext.to(**host), upooled.to(**host),
                           micro.to(**host))
