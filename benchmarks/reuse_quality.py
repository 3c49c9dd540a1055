"""Context reuse quality on ShapeBench: accuracy and token agreement of each setting against no acceleration.

    python benchmarks/reuse_quality.py --split val --json reuse_quality_val.json      # choose settings here
    python benchmarks/reuse_quality.py --split test --json reuse_quality_test.json    # report these
    python benchmarks/reuse_quality.py --model checkpoints/tiny-shapes-w4a8-scq --split test --json scq.json
    python benchmarks/reuse_quality.py --split val --per-category 256 --json val1280.json  # 1280 prompts: less noise
    python benchmarks/reuse_quality.py --split val --steps 48 --json val48.json           # at 48 steps
    python benchmarks/reuse_quality.py --split val --start 256 --json confirm.json        # val prompts 256+ of each
                                                                                           # category: a fresh draw
    python benchmarks/reuse_quality.py --json confirm.json --render   # the tables again from the JSON, no generation

Settings (--settings, comma list; the model's own sampler is the base):
    none            no acceleration
    steps-N         N sampling steps instead (the "fewer steps" baseline)
    tome            TomeMGT at its defaults (ratio 0.5, joint blocks, decoded schedule)
    reuse-K         context reuse, a full step every K steps, ReCAP's confidence group
    reuse-K-cells   the same group taken in whole 2×2 cells
    reuse-K-masked  the local steps computing every masked token
    reuse-K-wW      ... with the first W steps full (combine: reuse-3-cells-w2)
    reuse-K-rR      ... with selective K/V refresh of the fraction R of the decoded tokens (reuse-3-cells-w2-r0.1)
    reuse-K-...-tome  ... with TomeMGT at its defaults inside the full steps (reuse-3-cells-w2-tome)
For each: overall and per-category accuracy, token agreement with `none` (same seeds), the NFE, how
many of them were local steps, the token NFE (a local step counted as the fraction of image tokens it
computed; mean over 8 prompts), and the paired accuracy difference with its 95% interval
(benchmarks/paired.py) against `none` and, for a reuse setting, against the steps-N setting of the run
nearest its token NFE from above (fewer steps at the same cost: the bar reuse has to clear). The speed of
a setting is bench_reuse.py's (meissonic-1024): this script measures quality only. Writes the JSON and a
Markdown table beside it (.md). Resumable: a setting already in the JSON for the same model, split, prompt
count, base sampler and kernels is kept (`none`'s tokens are kept beside it); a quantized model's scores
follow the CPU class's kernels, so another machine starts over.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline, interleave_categories
from mgtq.files import atomic_write_text, read_json, save_safetensors, write_json
from mgtq.hashing import model_fingerprint
from mgtq.merging import TomeConfig
from mgtq.pipeline import MGTPipeline
from mgtq.quantization.kernels import describe_kernels, kernels_label
from mgtq.sampling import SamplerConfig
from mgtq.shapes import shapebench_prompts
from mgtq.shapes.shapebench import DEFAULT_PER_CATEGORY

from paired import paired_cell, paired_or_none  # this folder's

DEFAULT_SETTINGS = "none,steps-12,steps-8,tome,reuse-2,reuse-3,reuse-3-cells,reuse-4-cells,reuse-3-masked"


def parse_setting(name: str, base: SamplerConfig) -> tuple[SamplerConfig, TomeConfig | None]:
    """A setting name (see the module docstring) → (its sampler config, its TomeMGT config or None)."""
    parts = name.split("-")
    try:
        if name == "none":
            return base, None
        if name == "tome":
            return base, TomeConfig()
        if parts[0] == "steps" and len(parts) == 2:
            return base.replace(num_steps=int(parts[1])), None
        if parts[0] == "reuse" and len(parts) >= 2:
            reuse, tome = {"interval": int(parts[1])}, parts[-1] == "tome"
            for extra in parts[2:len(parts) - tome]:
                if extra in ("masked", "cells"):
                    reuse["group"] = extra
                elif extra.startswith("w"):
                    reuse["warmup"] = int(extra[1:])
                elif extra.startswith("r"):
                    reuse["refresh"] = float(extra[1:])
                else:
                    raise ValueError(extra)
            return base.replace(reuse=reuse), (TomeConfig() if tome else None)
    except ValueError:
        pass
    raise ValueError(f"unknown setting {name!r}: none, steps-N, tome, reuse-K[-cells|-masked][-wW][-rR][-tome]")


def fewer_steps_at_cost(name: str, settings: dict) -> str | None:
    """The steps-N setting of the run nearest a reuse setting's token NFE from above: issue 27's bar is reuse beating
    fewer steps at the same cost, and the cheapest steps-N costing at least as much is the fair (generous) match."""
    if not name.startswith("reuse-"):
        return None
    cost = settings[name]["token_nfe"]
    dearer = [other for other in settings if other.startswith("steps-") and settings[other]["token_nfe"] >= cost]
    return min(dearer, key=lambda other: settings[other]["token_nfe"], default=None)


def with_paired(data: dict) -> dict:
    """`data` with each setting's paired differences from the per-prompt verdicts (`paired_vs_<reference>`, None
    where a side lacks `ok`): against `none`, and a reuse setting's against `fewer_steps_at_cost` too."""
    settings = {}
    for name, row in data["settings"].items():
        row = {k: v for k, v in row.items() if not k.startswith("paired_vs_") and k != "fewer_steps_at_cost"}
        for reference in ([] if name == "none" else ["none"]) + [fewer_steps_at_cost(name, data["settings"])]:
            if reference in data["settings"]:
                row[f"paired_vs_{reference}"] = paired_or_none(data["settings"][reference].get("ok"), row.get("ok"))
        if name.startswith("reuse-"):
            row["fewer_steps_at_cost"] = fewer_steps_at_cost(name, data["settings"])
        settings[name] = row
    return {**data, "settings": settings}


def asked_order(command: str) -> list[str]:
    """The settings in the order the run's command asked for them (`none` first): the JSON keeps them sorted."""
    words = shlex.split(command)
    asked = next((w.partition("=")[2] for w in words if w.startswith("--settings=")), None)
    if asked is None and "--settings" in words[:-1]:
        asked = words[words.index("--settings") + 1]
    return ["none", *[n for n in (asked or DEFAULT_SETTINGS).split(",") if n and n != "none"]]


def to_markdown(data: dict) -> str:
    data = with_paired(data)
    order = asked_order(data["command"])
    rows = sorted(data["settings"].values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    kernels = data.get("identity", {}).get("kernels")
    lines = [f"# Context reuse on ShapeBench {data['split']} (n = {data['n']}, {data['model']})", "",
             f"`{data['command']}`", "", *([f"Kernels: {kernels_label(kernels)}", ""] if kernels else []),
             "Δ: paired accuracy difference on the same prompts and seeds, with its 95% interval (Newcombe's "
             "method 10); fewer steps: the steps-N setting of this run nearest the row's token NFE from above.", "",
             "| setting | overall | Δ vs none [95% CI] | token agreement | NFE | of which local | token NFE | "
             "Δ vs fewer steps at ≥ its token NFE [95% CI] |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        versus_none = paired_cell(row["paired_vs_none"]) if "paired_vs_none" in row else ""
        fewer = row.get("fewer_steps_at_cost")
        versus_fewer = ("" if not row["name"].startswith("reuse-") else "no steps-N at its cost in this run"
                        if fewer is None else f"{fewer}: {paired_cell(row[f'paired_vs_{fewer}'])}")
        lines.append(f"| {row['name']} | {row['overall']:.3f} | {versus_none} | {row['token_agreement']:.3f} | "
                     f"{row['nfe']} | {row['local_nfe']} | {row['token_nfe']:.1f} | {versus_fewer} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="val to choose settings, test to report")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma list (see above)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts (default: all)")
    p.add_argument("--per-category", type=int, default=None,
                   help=f"prompts per category (default {DEFAULT_PER_CATEGORY}: ShapeBench's 320); more on val "
                        "tells settings apart that differ by less than the 320's noise")
    p.add_argument("--start", type=int, default=0,
                   help="skip each category's first prompts (default 0): e.g. --split val --start 256, val prompts "
                        "no run with --per-category 256 has seen, to confirm a choice made on those")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps of every setting but steps-N (default: the model's, 16 for the embedded one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--render", action="store_true",
                   help="only recompute the paired comparisons in --json and rewrite its Markdown (no generation)")
    args = p.parse_args(argv)
    if args.render:
        data = with_paired(read_json(args.json))
        write_json(args.json, data)
        atomic_write_text(args.json.with_suffix(".md"), to_markdown(data))
        return 0
    torch.set_num_threads(args.threads)
    pipe = MGTPipeline.from_pretrained(args.model or default_model())
    base = pipe.settings.sampler if args.steps is None else pipe.settings.sampler.replace(num_steps=args.steps)
    names = ["none", *[n for n in args.settings.split(",") if n and n != "none"]]
    try:
        configs = {name: parse_setting(name, base) for name in names}
    except ValueError as err:
        p.error(str(err))
    command = "python benchmarks/reuse_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    model_dir = Path(args.model or default_model())
    # What a kept setting must share with this run, as the JSON reads it back (lists, not tuples).
    identity = json.loads(json.dumps({"model_sha256": model_fingerprint(model_dir), "split": args.split,
                                      "limit": args.limit, **({"per_category": args.per_category} if args.per_category else {}),
                                      **({"start": args.start} if args.start else {}),
                                      "base_sampler": base.to_dict(), "kernels": describe_kernels(pipe.device)}))
    data = read_json(args.json) if args.json.is_file() else {}
    tokens_path = args.json.with_suffix(".none_tokens.safetensors")  # `none`'s tokens: agreement after a resume
    if data.get("identity") != identity or not tokens_path.is_file():
        data = {"identity": identity, "settings": {}}  # another model, split or sampler: start over
    data.update(command=command, split=args.split, model=str(args.model or "embedded default"),
                base_sampler=base.to_dict())
    reference = load_file(tokens_path)["tokens"] if "none" in data["settings"] else None
    for name, (sampler, tome) in configs.items():
        if name in data["settings"]:  # resumable: measured before on the same model, prompts and sampler
            print(f"{name}: kept from {args.json.name}", flush=True)
            continue
        result = evaluate_pipeline(pipe, args.limit, sampler, progress=False, split=args.split, reference_tokens=reference,
                                   per_category=args.per_category, start=args.start,
                                   **({"token_merging": tome} if tome is not None else {}))
        if reference is None:
            reference = result["tokens"]
            save_safetensors({"tokens": reference.contiguous()}, tokens_path)
        local_nfe, token_nfe = _costs(pipe, sampler, args.split)
        data["n"] = result["n"]
        data["settings"][name] = {"name": name, "overall": result["overall"], "per_category": result["per_category"],
                                  "token_agreement": result.get("token_agreement", 1.0), "nfe": result["nfe"],
                                  "local_nfe": local_nfe, "token_nfe": token_nfe, "sampler": sampler.to_dict(),
                                  "ok": [row["ok"] for row in result["per_prompt"]]}  # for paired comparisons
        row = data["settings"][name]
        versus = paired_or_none(data["settings"]["none"].get("ok"), row["ok"])
        versus = "" if name == "none" else f", vs none {paired_cell(versus)}"
        print(f"{name}: {row['overall']:.3f} (agreement {row['token_agreement']:.3f}{versus})", flush=True)
        write_json(args.json, data)
    data = with_paired(data)
    write_json(args.json, data)
    atomic_write_text(args.json.with_suffix(".md"), to_markdown(data))
    return 0


def _costs(pipe: MGTPipeline, sampler: SamplerConfig, split: str, prompts: int = 8) -> tuple[int, float]:
    """(local steps per image, token NFE per image: mean over the first `prompts` prompts of the split).

    TomeMGT's cost is not in token NFE (its blocks still compute every token's MLP): it counts full steps.
    """
    if not sampler.reuse.enabled:
        return 0, float(sampler.num_steps)
    items = interleave_categories(shapebench_prompts(DEFAULT_PER_CATEGORY, split))[:prompts]
    out = pipe([it.prompt for it in items], seed=[it.seed for it in items], sampler=sampler, progress=False,
               output_type="latent")
    return out.local_nfe, out.token_nfe


if __name__ == "__main__":
    raise SystemExit(main())
