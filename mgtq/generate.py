"""Generate images to PNG files (what `mgtq generate` calls)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the pipeline (torch, diffusers) is not needed to check --out
    from mgtq.pipeline import MGTPipeline

OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def output_paths(out: Path, count: int) -> list[Path]:
    """PNG paths for `count` images: out itself for one image, NAME-i.png for several; a folder gets i.png."""
    out = Path(out)
    if out.suffix.lower() in OTHER_IMAGE_SUFFIXES:  # would silently become a folder named "x.jpg"
        raise ValueError(f"--out {out}: mgtq writes PNG images; give a .png path or a folder")
    if out.suffix.lower() != ".png":  # a folder
        if out.exists() and not out.is_dir():
            from mgtq.files import describe_path

            raise NotADirectoryError(f"--out {out} {describe_path(out)}, not a folder; give a .png path or a folder")
        return [out / f"{i}.png" for i in range(count)]
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}.png") for i in range(count)]


def generate_to_files(
    pipe: MGTPipeline, prompt: str | list[str], out: Path, negative_prompt: str | None = None, steps: int | None = None,
    cfg: float | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
    num_images: int = 1, progress: bool = True, batch_size: int | None = None,
    on_write: Callable[[Path], object] | None = None, **call_kwargs,
) -> list[Path]:
    """Generate `num_images` images of each prompt and write them as PNG, prompt-major; image i (over all
    prompts) uses seed + i, its random numbers the same whatever the batch size (its pixels too, but for a rare near-tie
    that another batch size's rounding turns; see `MGTPipeline.__call__`). batch_size: prompts per pipeline call.
    on_write: called with each path once its PNG is written (`mgtq generate` prints it then, so a run stopped
    part-way has said which images it finished)."""
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch_size = batch_size or len(prompts)
    paths = output_paths(out, num_images * len(prompts))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        first = start * num_images
        seeds = list(range(seed + first, seed + first + len(chunk) * num_images))
        result = pipe(chunk, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=cfg,
                      height=height, width=width, num_images_per_prompt=num_images, seed=seeds, progress=progress,
                      **call_kwargs)
        for image, path in zip(result.images, paths[first:first + len(seeds)]):
            write_png(image, path)
            if on_write is not None:
                on_write(path)
    return paths


def write_png(image, path: Path) -> None:
    """Save a PIL image as PNG through mgtq's one file writer: never a half-written PNG, nor a leftover
    temporary file, and never a replaced device, FIFO or link."""
    from mgtq.files import atomic_file

    with atomic_file(Path(path)) as tmp:
        image.save(tmp, format="PNG")
