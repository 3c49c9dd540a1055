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

from mgtq.files import describe_path
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


def synthesize(pipe: MGTPipeline, pairs: list[tuple[str, int]], sampler: SamplerConfig, resolution: int,
               batch_size: int, progress: bool = True, desc: str = "synthesize", keep_images: bool = True):
    """Generate one image per (prompt, seed) → `datasets.Dataset` (prompt, seed, image, tokens (h·w)); without
    `keep_images`, the tokens only (no VQ decoding, no image column)."""
    from datasets import Dataset, Features, Image, Sequence, Value

    columns = {"prompt": Value("string"), "seed": Value("int64"), "image": Image(), "tokens": Sequence(Value("int32"))}
    if not keep_images:
        del columns["image"]
    rows = {name: [] for name in columns}
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress):
        chunk = pairs[start : start + batch_size]
        result = pipe([p for p, _ in chunk], seed=[s for _, s in chunk], sampler=sampler, height=resolution,
                      width=resolution, progress=False, output_type="pil" if keep_images else "latent")
        rows["prompt"] += [p for p, _ in chunk]
        rows["seed"] += [s for _, s in chunk]
        if keep_images:
            rows["image"] += result.images
        rows["tokens"] += result.tokens.flatten(1).tolist()
    return Dataset.from_dict(rows, features=Features(columns))


@dataclass
class CalibrationData:
    """Synthesized tokens (S, h, w) with text features of their prompts and of the empty prompt."""

    tokens: torch.Tensor
    text: torch.Tensor  # (S, L, C)
    pooled: torch.Tensor  # (S, P)
    uncond_text: torch.Tensor  # (1, L, C)
    uncond_pooled: torch.Tensor  # (1, P)
    micro_conds: torch.Tensor  # (1, 5)


def calibration_data(dataset, pipe: MGTPipeline, token_grid: tuple[int, int], resolution: int) -> CalibrationData:
    """The synthesized `dataset` as tensors, its prompts encoded by `pipe`'s text encoder."""
    h, w = token_grid
    tokens = torch.tensor(dataset["tokens"], dtype=torch.long).view(-1, h, w)
    with torch.inference_mode():
        text, pooled = pipe.encode_prompt(list(dataset["prompt"]))
        utext, upooled = pipe.encode_prompt([""])
    micro = micro_conditions(resolution, resolution, pipe.settings.aesthetic_score)
    # fp32 copies on the host, as the tokens (ordinary tensors, not inference ones: QAT trains on them); each stage
    # moves what a batch needs to its model's device
    host = dict(device="cpu", dtype=torch.float32, copy=True)
    return CalibrationData(tokens, text.to(**host), pooled.to(**host), utext.to(**host), upooled.to(**host),
                           micro.to(**host))
