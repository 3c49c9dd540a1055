"""ShapeBench-Edit on the embedded model: float, bf16, SCQ and SCQ + TomeMGT, the four editing tasks.

    python benchmarks/shapebench_edit.py --threads 2        # after the README set-up (it exports the SCQ checkpoint)
    python benchmarks/shapebench_edit.py --limit 4 --out "$(mktemp -d)/edit"     # a smoke run
    python benchmarks/shapebench_edit.py --split val --per-task 512 --tasks inpaint replace outpaint \
        --inpaint-schedule cosine --out edit_val_cosine     # inpainting on another schedule than its default

A model is `float`, `bf16` (the embedded model in that dtype), `scq=DIR` (an exported checkpoint) or
`scq+tome=DIR` (the same with TomeMGT at its defaults, ratio 0.5). Each model runs every task of
mgtq.shapes.edit and, as the reference of the inpaint goal, text-to-image on the inpaint items'
captions and seeds (`t2i`). Resumable: a (model, task) row already in OUT.json for the same split,
items, model weights, kernels, sampler settings and editing rules is kept. Writes OUT.json, OUT.md and
OUT.png (inputs, masks and one model's outputs; green frame: accepted by the scorer, red: rejected);
default OUT is benchmarks/results/shapebench_edit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mgtq.default_model import default_model
from mgtq.editing import MGTImg2ImgPipeline, MGTInpaintPipeline
from mgtq.evaluation import edit_summary_line, evaluate_editing
from mgtq.files import atomic_write_text, read_json, write_json
from mgtq.generate import write_png
from mgtq.hashing import model_fingerprint
from mgtq.pipeline import MGTPipeline
from mgtq.quantization.kernels import describe_kernels, kernels_label
from mgtq.sampling.schedules import SCHEDULES
from mgtq.shapes import evaluate, score_image
from mgtq.shapes.edit import DEFAULT_PER_TASK, EDIT_TASKS, edit_inputs, shapebench_edit_items

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCQ = "checkpoints/tiny-shapes-w4a8-scq"
DEFAULT_MODELS = ("float", "bf16", f"scq={SCQ}", f"scq+tome={SCQ}")
GOAL_MARGIN = 0.03  # SCQ ≥ float − 0.03 on every task
# mgtq's editing rules, part of a row's key: 2 = img2img strength as diffusers counts it (the share of the steps
# run), inpainting on SamplerConfig.inpaint_schedule; 1 (rows without the key) = strength as the masked fraction.
EDIT_RULES = 2
# TomeMGT's rules, part of the key of a merging model's rows: 2 = each sample its own merge count, σ over the
# repainted area in inpainting; 1 (rows without the key) = one count a batch, σ over the whole image.
MERGE_RULES = 2


def load_model(spec: str) -> tuple[MGTPipeline, Path]:
    """(pipeline, its folder) of a model spec: float | bf16 | scq=DIR | scq+tome=DIR."""
    name, _, folder = spec.partition("=")
    if name in ("float", "bf16") and not folder:
        path = default_model()
        return MGTPipeline.from_pretrained(path, torch_dtype="bf16" if name == "bf16" else None), path
    if name not in ("scq", "scq+tome") or not folder:
        raise ValueError(f"model {spec!r}: use float, bf16, scq=DIR or scq+tome=DIR")
    path = Path(folder) if Path(folder).is_absolute() else ROOT / folder
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r}: {path} does not exist; export the SCQ checkpoint first "
                                "(the README's set-up command does)")
    pipe = MGTPipeline.from_pretrained(path)
    if name == "scq+tome":
        from mgtq.merging import apply_tomemgt

        apply_tomemgt(pipe, 0.5)
    return pipe, path


def set_inpaint_schedule(pipe: MGTPipeline, schedule: str | None) -> None:
    """Inpaint on `schedule` ("same": text-to-image's; None: leave the model's setting)."""
    if schedule is not None:
        pipe.settings.sampler = pipe.settings.sampler.replace(inpaint_schedule=None if schedule == "same" else schedule)


def text_to_image_reference(pipe: MGTPipeline, limit: int | None, split: str, batch_size: int,
                            per_task: int = DEFAULT_PER_TASK) -> dict:
    """Text-to-image accuracy on the inpaint items' captions and seeds (what inpainting is compared with)."""
    items = shapebench_edit_items("inpaint", per_task, split)[:limit]
    t0 = time.perf_counter()
    images = []
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        images += pipe([it.prompt for it in chunk], seed=[it.seed for it in chunk], progress=False).images
    result = evaluate(images, items)
    result.update(task="t2i", split=split, seconds=time.perf_counter() - t0, preserved=None,
                  kernels=describe_kernels(pipe.device))
    return result


def run(models: list[str], tasks: list[str], split: str, limit: int | None, batch_size: int, out: Path,
        per_task: int = DEFAULT_PER_TASK, inpaint_schedule: str | None = None) -> dict:
    """Every (model, task) row not already in OUT.json for the same inputs; `inpaint_schedule` overrides the
    models' SamplerConfig.inpaint_schedule ("same": text-to-image's schedule)."""
    path = out.with_suffix(".json")
    data = read_json(path) if path.exists() else {"rows": {}}
    for spec in models:
        pipe, folder = load_model(spec)
        set_inpaint_schedule(pipe, inpaint_schedule)
        fingerprint, kernels = model_fingerprint(folder), describe_kernels(pipe.device)
        sampler = pipe.settings.sampler.to_dict()
        for task in [*tasks, "t2i"]:
            key = f"{spec}|{task}"
            old = data["rows"].get(key)
            # kept if measured on the same weights, prompts, kernels (a quantized model's score follows them),
            # sampler settings and editing rules
            merge_rules = MERGE_RULES if pipe.transformer.token_hook is not None else None
            inputs = json.loads(json.dumps([split, limit, per_task, fingerprint, kernels, sampler, EDIT_RULES,
                                            merge_rules]))
            if old and [old.get(k) for k in ROW_KEY] == inputs:  # as JSON holds them (tuples are lists there)
                print(f"{key}: kept from {path.name}")
                continue
            if task == "t2i":
                result = text_to_image_reference(pipe, limit, split, batch_size, per_task)
            else:
                result = evaluate_editing(pipe, task, limit=limit, batch_size=batch_size, split=split, progress=False,
                                          per_task=per_task)
            result.update(model=spec, limit=limit, per_task=per_task, fingerprint=fingerprint, sampler=sampler,
                          edit_rules=EDIT_RULES, merge_rules=merge_rules)
            data["rows"][key] = result
            print(f"{spec}: " + (edit_summary_line(result) if task != "t2i" else
                                 f"text-to-image on the inpaint captions accuracy={result['overall']:.3f}"))
            write_json(path, data)  # after every row: a stopped run resumes here
    data["command"] = "python benchmarks/shapebench_edit.py " + " ".join(sys.argv[1:])
    write_json(path, data)
    return data


ROW_KEY = ("split", "limit", "per_task", "fingerprint", "kernels", "sampler", "edit_rules", "merge_rules")


def to_markdown(data: dict, models: list[str], tasks: list[str]) -> str:
    rows = data["rows"]
    head = ["model", *[t if t != "img2img" else "img2img 0.5 / 0.8" for t in tasks], "t2i (inpaint captions)",
            "unmasked tokens kept"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for spec in models:
        cells = [spec.split("=")[0]]
        for task in tasks:
            r = rows.get(f"{spec}|{task}")
            if r is None:
                cells.append("–")
            elif task == "img2img":
                cells.append(" / ".join(f"{v:.3f}" for v in r["per_strength"].values()))
            else:
                cells.append(f"{r['overall']:.3f}")
        t2i = rows.get(f"{spec}|t2i")
        cells.append(f"{t2i['overall']:.3f}" if t2i else "–")
        kept = [rows[f"{spec}|{t}"]["preserved"] for t in tasks if f"{spec}|{t}" in rows and t != "img2img"]
        cells.append(f"{min(kept):.4f}" if kept else "–")
        lines.append("| " + " | ".join(cells) + " |")
    any_row = next(iter(rows.values()))
    sizes = ", ".join(f"{t} {r['n']}" for t in tasks
                      for r in [next((v for k, v in rows.items() if k.endswith(f"|{t}")), None)] if r)
    limit = f"the first {any_row['limit']}" if any_row['limit'] else f"all {any_row.get('per_task', DEFAULT_PER_TASK)}"
    schedules = sorted({str((r.get("sampler") or {}).get("inpaint_schedule", "cosine")) for r in rows.values()})
    lines += ["", f"Split {any_row['split']}, {limit} items per task (images scored: {sizes}; img2img counts both "
              f"strengths), the model's own sampler settings; inpainting on the {' / '.join(schedules)} schedule "
              "(None: text-to-image's). "
              f"`{data.get('command', 'python benchmarks/shapebench_edit.py')}`", "",
              *sorted({f"Kernels: {kernels_label(r['kernels'])}" for r in rows.values() if r.get("kernels")}),
              "", *goal_lines(rows, models, tasks)]
    return "\n".join(lines) + "\n"


def goal_lines(rows: dict, models: list[str], tasks: list[str]) -> list[str]:
    """The issue's goals, each met or missed, from the rows present."""
    out = []
    float_spec = "float" if "float" in models else None
    for spec in (m for m in models if m.startswith("scq") and float_spec):
        for task in tasks:
            a, b = rows.get(f"{spec}|{task}"), rows.get(f"float|{task}")
            if a and b:
                verdict = "met" if a["overall"] >= b["overall"] - GOAL_MARGIN else "missed"
                out.append(f"- {spec.split('=')[0]} ≥ float − {GOAL_MARGIN} on {task}: {a['overall']:.3f} vs "
                           f"{b['overall']:.3f}, {verdict}")
    for spec in models:
        kept = [rows[f"{spec}|{t}"]["preserved"] for t in tasks if f"{spec}|{t}" in rows and t != "img2img"]
        if kept:
            out.append(f"- {spec.split('=')[0]}: every unmasked token kept: {'met' if min(kept) == 1.0 else 'missed'}")
        a, b = rows.get(f"{spec}|inpaint"), rows.get(f"{spec}|t2i")
        if a and b:
            out.append(f"- {spec.split('=')[0]}: inpaint ≥ text-to-image on the same captions: {a['overall']:.3f} vs "
                       f"{b['overall']:.3f}, {'met' if a['overall'] >= b['overall'] else 'missed'}")
    return out


def sample_grid(pipe: MGTPipeline, tasks: list[str], split: str, out: Path, per_task: int = 4, scale: int = 2,
                per_row: int = 2) -> None:
    """(input, mask, output) per item, `per_row` items a row; the output framed green (accepted) or red (rejected)."""
    inpaint, img2img = MGTInpaintPipeline.from_pipe(pipe), MGTImg2ImgPipeline.from_pipe(pipe)
    side, text_h = 64 * scale, 40
    cells = []
    for task in tasks:
        for item in shapebench_edit_items(task, per_task, split)[:per_task]:
            image, mask = edit_inputs(item)
            if mask is None:
                result = img2img(item.prompt, image=image, strength=item.strength, seed=item.seed, progress=False)
                mask_img = Image.new("RGB", (64, 64), (128, 128, 128))
            else:
                result = inpaint(item.prompt, image=image, mask_image=mask, seed=item.seed, progress=False)
                mask_img = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
            label = f"{task}" + (f" {item.strength}" if item.strength else "") + f": {item.prompt}"
            cells.append((Image.fromarray(image), mask_img, result.images[0], label,
                          score_image(result.images[0], item.prompt)[0]))
    width = 3 * side + side // 4  # one item and a gap
    grid = Image.new("RGB", (per_row * width, -(-len(cells) // per_row) * (side + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, mask_img, output, label, ok) in enumerate(cells):
        x, y = (i % per_row) * width, (i // per_row) * (side + text_h)
        for col, im in enumerate((image, mask_img, output)):
            grid.paste(im.resize((side, side), Image.NEAREST), (x + col * side, y))
        colour = (20, 140, 40) if ok else (200, 30, 30)
        draw.rectangle((x + 2 * side + 1, y + 1, x + 3 * side - 2, y + side - 2), outline=colour, width=3)
        words, lines, line = label.split(), [], ""
        for w in words:
            if len(line) + len(w) > 62:
                lines.append(line)
                line = ""
            line += (" " if line else "") + w
        lines.append(line)
        draw.multiline_text((x + 3, y + side + 2), "\n".join(lines[:2]), fill=colour)
    write_png(grid, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="float bf16 scq=DIR scq+tome=DIR")
    p.add_argument("--tasks", nargs="+", choices=EDIT_TASKS, default=list(EDIT_TASKS))
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (default: all)")
    p.add_argument("--per-task", type=int, default=DEFAULT_PER_TASK, help="items drawn per task")
    p.add_argument("--inpaint-schedule", choices=(*SCHEDULES, "same"), default=None,
                   help="inpainting's mask schedule for every model (default: each model's SamplerConfig's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--grid-model", default=None,
                   help="the model whose outputs the PNG shows (default: the first scq=DIR, else the first)")
    p.add_argument("--out", type=Path, default=RESULTS / "shapebench_edit")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args.models, args.tasks, args.split, args.limit, args.batch_size, args.out, args.per_task,
               args.inpaint_schedule)
    md = to_markdown(data, args.models, args.tasks)
    atomic_write_text(args.out.with_suffix(".md"), md)
    grid_model = args.grid_model or next((m for m in args.models if m.startswith("scq=")), args.models[0])
    grid_pipe = load_model(grid_model)[0]
    set_inpaint_schedule(grid_pipe, args.inpaint_schedule)
    sample_grid(grid_pipe, args.tasks, args.split, args.out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
