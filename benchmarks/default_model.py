"""The embedded tiny-shapes model: a grid of samples for the README and the one-image latency.

    python benchmarks/default_model.py                  # grid + latency
Writes benchmarks/results/default_model_grid.png and default_model_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mgtq.default_model import default_model
from mgtq.files import write_json
from mgtq.pipeline import MGTPipeline
from mgtq.shapes import score_image

RESULTS = Path(__file__).resolve().parent / "results"


def grid_prompts(count: int = 12) -> list[tuple[str, int]]:
    """The first `count` ShapeBench prompts (balanced over categories) with their seeds."""
    from mgtq.evaluation import interleave_categories
    from mgtq.shapes import shapebench_prompts

    return [(it.prompt, it.seed) for it in interleave_categories(shapebench_prompts())[:count]]


def sample_grid(pipe: MGTPipeline, prompts, out: Path, cols: int = 4, scale: int = 3) -> list[bool]:
    """Generate each (prompt, seed), tile them with their captions and the scorer's verdict."""
    result = pipe([p for p, _ in prompts], seed=[s for _, s in prompts], progress=False)
    verdicts = [score_image(img, p)[0] for img, (p, _) in zip(result.images, prompts)]
    side, caption_h = 64 * scale, 46
    rows = -(-len(prompts) // cols)
    grid = Image.new("RGB", (cols * side, rows * (side + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, (prompt, _), ok) in enumerate(zip(result.images, prompts, verdicts)):
        x, y = (i % cols) * side, (i // cols) * (side + caption_h)
        grid.paste(img.resize((side, side), Image.NEAREST), (x, y))
        words, line = prompt.split(), ""
        lines = []
        for w in words:
            if len(line) + len(w) > 30:
                lines.append(line)
                line = ""
            line += (" " if line else "") + w
        lines.append(line)
        # A coloured frame and word rather than ✓/✗: PIL's built-in font has no such glyphs.
        colour = (20, 140, 40) if ok else (200, 30, 30)
        draw.rectangle((x + 1, y + 1, x + side - 2, y + side - 2), outline=colour, width=3)
        caption_box = draw.multiline_textbbox((x + 3, y + side + 2), "\n".join(lines))
        draw.multiline_text((x + 3, y + side + 2), "\n".join(lines), fill="black")
        draw.text((x + 3, caption_box[3] + 3), "accepted" if ok else "rejected", fill=colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return verdicts


def image_latency(pipe: MGTPipeline, repeats: int = 10) -> dict:
    """Seconds for one image (batch 1, the model's sampler: steps, CFG) including VQ decode."""
    pipe("a red circle", seed=0, progress=False)  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe("a red circle above a blue square", seed=i, progress=False)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = MGTPipeline.from_pretrained(args.model or default_model())
    verdicts = sample_grid(pipe, grid_prompts(), RESULTS / "default_model_grid.png")
    lat = image_latency(pipe)
    sampler = pipe.settings.sampler
    payload = {"latency": lat, "threads": args.threads, "sampler": sampler.to_dict(),
               "grid_accepted": sum(verdicts), "grid_size": len(verdicts),
               "command": "python benchmarks/default_model.py"}
    write_json(RESULTS / "default_model_latency.json", payload)
    md = (f"One {sampler.num_steps}-step image (CFG {sampler.guidance_scale}, batch 1, VQ decode included, "
          f"{args.threads} threads): median {lat['median_s']:.3f} s (min {lat['min_s']:.3f}, max {lat['max_s']:.3f}, "
          f"{lat['repeats']} runs).\n")
    (RESULTS / "default_model_latency.md").write_text(md)
    print(md, f"grid: {sum(verdicts)}/{len(verdicts)} accepted by the scorer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
