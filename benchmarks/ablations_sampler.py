"""Enhanced-sampler ablations on ShapeBench (paper Tables 2, 8–11, 13–15), float and SCQ checkpoints.

For every configuration: ShapeBench accuracy, the per-prompt win/loss against vanilla at the same
steps and seeds, and NFE (transformer calls per image).

    python benchmarks/ablations_sampler.py --limit 160                       # float model
    python benchmarks/ablations_sampler.py --limit 160 --model checkpoints/tiny-shapes-w4a8-scq --tag scq
    python benchmarks/ablations_sampler.py --only rho,momentum               # some groups

Writes benchmarks/results/ablations_<tag>.json and .md, and a plot of the ρ sweep.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline
from mgtq.pipeline import MGTPipeline
from mgtq.sampling import SamplerConfig
from mgtq.utils import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def groups(base: SamplerConfig) -> dict[str, list[tuple[str, SamplerConfig]]]:
    """Named groups of (label, config); each group's vanilla reference is vanilla at the same steps."""
    t = base.num_steps
    v = SamplerConfig.preset("vanilla", base=base)
    at = lambda cfg, steps: cfg.replace(num_steps=steps)  # noqa: E731
    out = {
        "rho": [(f"{fam} ρ={rho}", v.replace(schedule=fam, rho=rho))
                for fam in ("pow", "root") for rho in (0.4, 0.6, 0.8, 1.5, 2.0)]
               + [("cosine", v), ("linear", v.replace(schedule="linear"))],
        "noise": [(f"noise {curve} α={a}", v.with_overrides({"noise.curve": curve, "noise.scale": a}))
                  for curve, a in (("abs_cos", 1.0), ("abs_cos", 2.0), ("half_abs_cos", 1.0), ("constant", 1.0),
                                   ("piecewise_v", 1.0), ("piecewise_ends", 1.0))],
        "differential": [(f"z={z}%", v.with_overrides({"differential.percent": float(z)})) for z in (0, 25, 50, 75, 100)],
        "zsampling": [(f"{variant} T={steps}", at(v.with_overrides({"zsampling.variant": variant}), steps))
                      for steps in (t, 2 * t) for variant in ("masked", "random", "recover")],
        "momentum": [(f"order {o} T={s}", at(v.with_overrides({"momentum.order": o}), s))
                     for s in (8, 12, 16, 32) for o in (1, 2)],
        "combos": [
            ("1−t^0.6", v.replace(schedule="root", rho=0.6)),
            ("1−t^0.6 + noise", v.replace(schedule="root", rho=0.6).with_overrides({"noise.curve": "abs_cos"})),
            ("1−t^0.6 + noise + diff 75%", v.replace(schedule="root", rho=0.6).with_overrides(
                {"noise.curve": "abs_cos", "differential.percent": 75.0})),
            ("enhanced preset", SamplerConfig.preset("enhanced", base=base)),
        ],
    }
    return out


def win_loss(rows: list[dict], reference: list[dict]) -> dict:
    wins = sum(r["ok"] and not q["ok"] for r, q in zip(rows, reference))
    losses = sum(q["ok"] and not r["ok"] for r, q in zip(rows, reference))
    decisive = wins + losses
    return {"wins": wins, "losses": losses, "ties": len(rows) - decisive,
            "win_rate": wins / decisive if decisive else 0.5}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--tag", default="float")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--only", default=None, help="comma-separated groups: " + ",".join(groups(SamplerConfig())))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = MGTPipeline.from_pretrained(args.model or default_model())
    base = pipe.settings.sampler
    selected = groups(base)
    if args.only:
        selected = {k: selected[k] for k in args.only.split(",")}
    vanilla_cache: dict[int, dict] = {}

    def vanilla(steps: int) -> dict:
        if steps not in vanilla_cache:
            vanilla_cache[steps] = evaluate_pipeline(pipe, args.limit, SamplerConfig.preset("vanilla", base=base)
                                                     .replace(num_steps=steps), progress=False)
        return vanilla_cache[steps]

    results = {}
    for group, configs in selected.items():
        results[group] = []
        for label, cfg in configs:
            t0 = time.perf_counter()
            res = evaluate_pipeline(pipe, args.limit, cfg, progress=False)
            ref = vanilla(cfg.num_steps)
            row = {"label": label, "accuracy": res["overall"], "per_category": res["per_category"], "nfe": res["nfe"],
                   "steps": cfg.num_steps, "vanilla_accuracy": ref["overall"],
                   **win_loss(res["per_prompt"], ref["per_prompt"]), "sampler": cfg.to_dict(),
                   "seconds": time.perf_counter() - t0}
            results[group].append(row)
            print(f"[{group}] {label:32s} acc={row['accuracy']:.3f} (vanilla {row['vanilla_accuracy']:.3f}) "
                  f"W/L={row['wins']}/{row['losses']} NFE={row['nfe']}", flush=True)

    n = next(iter(vanilla_cache.values()))["n"]
    payload = {"model": str(args.model or "tiny-shapes (embedded)"), "tag": args.tag, "n": n,
               "base_sampler": base.to_dict(), "groups": results,
               "command": "python benchmarks/ablations_sampler.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"ablations_{args.tag}.json", payload)
    lines = [f"ShapeBench n={n}, CFG {base.guidance_scale}, model: {payload['model']}", ""]
    for group, rows in results.items():
        lines += [f"### {group}", "", "| setting | steps | NFE | accuracy | vanilla (same steps) | wins / losses vs vanilla |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['label']} | {r['steps']} | {r['nfe']} | {r['accuracy']:.3f} | {r['vanilla_accuracy']:.3f} | "
                  f"{r['wins']} / {r['losses']} |" for r in rows]
        lines.append("")
    (RESULTS / f"ablations_{args.tag}.md").write_text("\n".join(lines))
    if "rho" in results:
        plot_rho(results["rho"], RESULTS / f"ablations_{args.tag}_rho.png")
    return 0


def plot_rho(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for fam, marker in (("pow", "o"), ("root", "s")):
        pts = sorted((r["sampler"]["rho"], r["accuracy"]) for r in rows if r["sampler"]["schedule"] == fam)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label="(1−t)^ρ" if fam == "pow" else "1−t^ρ")
    for r in rows:
        if r["sampler"]["schedule"] in ("cosine", "linear"):
            ax.axhline(r["accuracy"], ls="--", lw=1, color="gray" if r["sampler"]["schedule"] == "cosine" else "k")
            ax.text(2.0, r["accuracy"], r["label"], fontsize=7, va="bottom", ha="right")
    ax.set_xlabel("ρ")
    ax.set_ylabel("ShapeBench accuracy")
    ax.set_title("Mask schedule sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
