"""Choose the default model's vanilla-sampler settings on ShapeBench's validation split.

    python benchmarks/default_sampler_sweep.py --threads 2
    python benchmarks/default_sampler_sweep.py --render     # the tables again from the JSON, no generation

Sweeps the CFG scale and the starting Gumbel temperature of the official sampler (16 steps,
cosine schedule, temperature linear to 0) on the "val" prompts, which share no seed with the
reported "test" prompts, so the chosen setting is not fitted to the numbers it is judged by.
Resumable: each finished point is kept in the JSON and skipped when run again. With --apply, the
best point becomes the model's default sampler (its model_index.json; weights untouched).
Writes benchmarks/results/default_sampler_sweep.{json,md,png}.
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
from mgtq.pipeline import MGTPipeline, set_default_sampler

from paired import paired_cell, paired_or_none  # this folder's

RESULTS = Path(__file__).resolve().parent / "results"


def point_key(cfg: float, tau: float) -> str:
    return f"cfg={cfg:g},tau={tau:g}"


def best_point(points: dict) -> dict:
    """The highest overall accuracy; ties go to the lower CFG (fewer artefacts, and the simpler choice)."""
    return max(points.values(), key=lambda p: (p["overall"], -p["cfg"], -p["tau"]))


def to_markdown(data: dict) -> str:
    cfgs = sorted({p["cfg"] for p in data["points"].values()})
    taus = sorted({p["tau"] for p in data["points"].values()})
    lines = [f"# Default model: vanilla sampler on the ShapeBench val split ({data['steps']} steps, n = {data['n']})",
             "", f"`{data['command']}`", "", "Overall accuracy; rows: CFG scale, columns: starting Gumbel temperature τ.", "",
             "| CFG | " + " | ".join(f"τ={t:g}" for t in taus) + " |", "| ---: |" + " ---: |" * len(taus)]
    for c in cfgs:
        cells = [f"{data['points'][point_key(c, t)]['overall']:.3f}" if point_key(c, t) in data["points"] else "–"
                 for t in taus]
        lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    best = best_point(data["points"])
    cats = ", ".join(f"{k} {v:.3f}" for k, v in best["per_category"].items())
    lines += ["", f"Best: CFG {best['cfg']:g}, τ {best['tau']:g} → {best['overall']:.3f} ({cats}).", "",
              "Each point against the best: paired accuracy difference on the same prompts and seeds, with its 95% "
              "interval (Newcombe's method 10).", "",
              "| CFG | τ | overall | Δ vs best [95% CI] |", "| ---: | ---: | ---: | ---: |"]
    for p in sorted(data["points"].values(), key=lambda p: (p["cfg"], p["tau"])):
        if p is not best:
            lines.append(f"| {p['cfg']:g} | {p['tau']:g} | {p['overall']:.3f} | "
                         f"{paired_cell(paired_or_none(best.get('ok'), p.get('ok')))} |")
    return "\n".join(lines) + "\n"


def with_paired(data: dict) -> dict:
    """`data` with each point's paired accuracy difference against the best point on the same prompts
    (`paired_vs_best`, from the per-prompt verdicts; None where a side lacks them)."""
    best = best_point(data["points"])
    return {**data, "points": {key: {k: v for k, v in p.items() if k != "paired_vs_best"} if p is best else
                               {**p, "paired_vs_best": paired_or_none(best.get("ok"), p.get("ok"))}
                               for key, p in data["points"].items()}}


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = sorted({p["tau"] for p in data["points"].values()})
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for tau in taus:
        pts = sorted((p["cfg"], p["overall"]) for p in data["points"].values() if p["tau"] == tau)
        ax.plot(*zip(*pts), marker="o", label=f"Gumbel τ₀ = {tau:g}")
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("ShapeBench val accuracy")
    ax.set_title(f"Default model, vanilla sampler, {data['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    p.add_argument("--tau", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="starting Gumbel temperatures")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="first N val prompts (default: all 320)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--apply", action="store_true", help="write the best setting into the model's model_index.json")
    p.add_argument("--out", type=Path, default=RESULTS / "default_sampler_sweep.json")
    p.add_argument("--render", action="store_true",
                   help="only rewrite --out's paired comparisons and its Markdown from it (no generation)")
    args = p.parse_args(argv)
    if args.render:
        data = with_paired(read_json(args.out))
        write_json(args.out, data)
        atomic_write_text(args.out.with_suffix(".md"), to_markdown(data))
        return 0
    torch.set_num_threads(args.threads)

    model_dir = Path(args.model or default_model())
    pipe = MGTPipeline.from_pretrained(model_dir)
    command = "python benchmarks/default_sampler_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = read_json(args.out) if args.out.is_file() else {}
    settings = {"transformer_sha256": model_fingerprint(model_dir), "steps": args.steps, "limit": args.limit}
    if data.get("settings") != settings:
        data = {"settings": settings, "points": {}}  # another model or protocol: start over
    data.update(command=command, steps=args.steps, split="val")
    base = pipe.settings.sampler.with_overrides({"num_steps": args.steps})
    for cfg in args.cfg:
        for tau in args.tau:
            key = point_key(cfg, tau)
            if key in data["points"]:
                continue
            sampler = base.with_overrides({"guidance_scale": cfg, "gumbel_temperature": (tau, 0.0)})
            res = evaluate_pipeline(pipe, args.limit, sampler, progress=False, split="val")
            data["points"][key] = {"cfg": cfg, "tau": tau, "overall": res["overall"],
                                   "per_category": res["per_category"], "n": res["n"],
                                   "ok": [row["ok"] for row in res["per_prompt"]]}
            data["n"] = res["n"]
            print(f"{key}: {res['overall']:.3f}", flush=True)
            write_json(args.out, data)
    data = with_paired(data)
    data["best"] = best_point(data["points"])
    write_json(args.out, data)
    atomic_write_text(args.out.with_suffix(".md"), to_markdown(data))
    plot(data, args.out.with_suffix(".png"))
    print(to_markdown(data))
    if args.apply:
        best = data["best"]
        set_default_sampler(model_dir, pipe.settings.sampler.with_overrides(
            {"num_steps": args.steps, "guidance_scale": best["cfg"], "gumbel_temperature": (best["tau"], 0.0)}))
        print(f"default sampler of {model_dir.name}: CFG {best['cfg']:g}, Gumbel τ {best['tau']:g} → 0, {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
