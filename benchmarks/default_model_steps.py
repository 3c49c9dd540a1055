"""How many sampling steps the default model needs: ShapeBench accuracy against the step count.

    python benchmarks/default_model_steps.py --threads 2
    python benchmarks/default_model_steps.py --render     # the table again from the JSON, no generation

Scores the embedded model with its shipped vanilla sampler (CFG and Gumbel temperature as saved in
its model_index.json) at each step count on the ShapeBench test split. Nothing is chosen from
these numbers: they report the quality/latency trade-off a user gets by passing `--steps`, each with its
paired difference from the shipped step count and a 95% interval (benchmarks/paired.py).
Resumable: each finished point is kept in the JSON and skipped when run again.
Writes benchmarks/results/default_model_steps.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline
from mgtq.files import atomic_write_text, read_json, write_json
from mgtq.hashing import model_fingerprint
from mgtq.pipeline import MGTPipeline
from mgtq.shapes import CATEGORIES

from paired import paired_cell, paired_or_none  # this folder's

RESULTS = Path(__file__).resolve().parent / "results"
OVERALL_GOAL = 0.75  # the default model's target at ≤16 steps (README, "The embedded default model")


def with_paired(data: dict) -> dict:
    """`data` with each point's paired accuracy difference against the shipped step count on the same prompts
    (`paired_vs_shipped`, from the per-prompt verdicts; None where a side lacks them)."""
    shipped = data["points"].get(str(data["settings"]["sampler"]["num_steps"]))
    if shipped is None:
        return data
    return {**data, "points": {key: {**p, "paired_vs_shipped": paired_or_none(shipped.get("ok"), p.get("ok"))}
                               if p is not shipped else p for key, p in data["points"].items()}}


def to_markdown(data: dict) -> str:
    points = sorted(data["points"].values(), key=lambda p: p["steps"])
    cats = sorted(points[0]["per_category"], key=lambda c: (CATEGORIES + (c,)).index(c))  # ShapeBench's order
    shipped = data["settings"]["sampler"]["num_steps"]
    lines = [f"# Default model: ShapeBench {data['split']} accuracy by sampling steps (n = {data['n']})", "",
             f"`{data['command']}`", "", f"Sampler: {data['sampler']}.", "",
             f"Δ vs {shipped} steps (the shipped sampler's): paired accuracy difference on the same prompts and "
             "seeds, with its 95% interval (Newcombe's method 10).", "",
             f"| steps | overall | Δ vs {shipped} steps [95% CI] | " + " | ".join(cats) + " |",
             "| ---: | ---: | ---: |" + " ---: |" * len(cats)]
    for p in points:
        versus = paired_cell(p["paired_vs_shipped"]) if "paired_vs_shipped" in p else ""
        lines.append(f"| {p['steps']} | {p['overall']:.3f} | {versus} | "
                     + " | ".join(f"{p['per_category'][c]:.3f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(data["points"].values(), key=lambda p: p["steps"])
    steps = [p["steps"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(steps, [p["overall"] for p in points], marker="o", linewidth=2.5, color="black", label="overall")
    for cat in points[0]["per_category"]:
        ax.plot(steps, [p["per_category"][cat] for p in points], marker=".", alpha=0.7, label=cat)
    ax.axhline(OVERALL_GOAL, linestyle="--", color="grey", linewidth=1, label=f"overall goal {OVERALL_GOAL:g}")
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel(f"ShapeBench {data['split']} accuracy")
    ax.set_xticks(steps)
    ax.set_ylim(0, 1.02)
    ax.set_title("Default model, shipped vanilla sampler")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 12, 16, 24, 32])
    p.add_argument("--limit", type=int, default=None, help="first N test prompts (default: all 320)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "default_model_steps.json")
    p.add_argument("--render", action="store_true",
                   help="only rewrite --out's paired comparisons and its Markdown from it (no generation)")
    args = p.parse_args(argv)
    if args.render:
        data = with_paired(read_json(args.out))
        write_json(args.out, data)
        atomic_write_text(args.out.with_suffix(".md"), to_markdown(data))
        return 0
    if any(s < 1 for s in args.steps):
        p.error(f"--steps must be ≥ 1, got {args.steps}")
    torch.set_num_threads(args.threads)

    model_dir = Path(args.model or default_model())
    pipe = MGTPipeline.from_pretrained(model_dir)
    base = pipe.settings.sampler
    command = "python benchmarks/default_model_steps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = read_json(args.out) if args.out.is_file() else {}
    settings = {"transformer_sha256": model_fingerprint(model_dir), "limit": args.limit,
                "sampler": base.to_dict()}
    if data.get("settings") != settings:
        data = {"settings": settings, "points": {}}  # another model, sampler or protocol: start over
    data.update(command=command, split="test",
                sampler=f"CFG {base.guidance_scale:g}, Gumbel τ {base.gumbel_temperature[0]:g} → "
                        f"{base.gumbel_temperature[1]:g}, {base.schedule} schedule")
    for steps in args.steps:
        if str(steps) in data["points"]:
            continue
        res = evaluate_pipeline(pipe, args.limit, base.with_overrides({"num_steps": steps}), progress=False,
                                split="test")
        data["points"][str(steps)] = {"steps": steps, "overall": res["overall"],
                                      "per_category": res["per_category"], "n": res["n"],
                                      "ok": [row["ok"] for row in res["per_prompt"]]}
        data["n"] = res["n"]
        print(f"{steps} steps: {res['overall']:.3f}", flush=True)
        write_json(args.out, data)
    data = with_paired(data)
    write_json(args.out, data)
    atomic_write_text(args.out.with_suffix(".md"), to_markdown(data))
    plot(data, args.out.with_suffix(".png"))
    print(to_markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
