"""Accuracy against speed-up: reuse_quality.py's settings joined with bench_reuse.py's speed-ups, Pareto front marked.

    python benchmarks/plot_reuse.py --quality reuse_quality_test.json --speed speed_*.json --format bf16 \
        --out reuse_pareto.png

A reuse setting's speed-up is the bench_reuse.py run whose sampler has the same reuse section (interval,
group, warm-up, K/V refresh; results written before refresh existed count as refresh 0); "none" is 1;
"steps-N" is T/N for the quality run's T steps (every step costs a plain forward: the "fewer steps"
baseline to beat, drawn as a line). Settings without a speed run are listed
in the table, not plotted. Writes the PNG and a Markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mgtq.files import atomic_file, atomic_write_text, read_json

REUSE_KEYS = ("interval", "group", "warmup", "refresh")


def _reuse_key(reuse: dict) -> tuple:
    return tuple(reuse.get(k, 0.0) if k == "refresh" else reuse[k] for k in REUSE_KEYS)


def speedups(quality: dict, speeds: list[dict], fmt: str) -> dict[str, float | None]:
    """Setting name → speed-up in format `fmt` (None where no speed run matches)."""
    steps = quality["base_sampler"]["num_steps"]
    by_reuse = {_reuse_key(run["sampler"]["reuse"]): run["formats"][fmt]["speedup"]
                for run in speeds if fmt in run["formats"]}
    out = {}
    for name, row in quality["settings"].items():
        reuse = row["sampler"]["reuse"]
        if name == "none":
            out[name] = 1.0
        elif name.startswith("steps-"):
            out[name] = steps / row["sampler"]["num_steps"]
        elif reuse["interval"] > 1:
            out[name] = by_reuse.get(_reuse_key(reuse))
        else:
            out[name] = None
    return out


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names of the (speed-up, accuracy) points no other point beats in both (ties kept)."""
    return {name for name, (s, a) in points.items()
            if not any(s2 >= s and a2 >= a and (s2, a2) != (s, a) for s2, a2 in points.values())}


def to_markdown(quality: dict, speed: dict, front: set[str], fmt: str) -> str:
    lines = [f"# Context reuse: ShapeBench {quality['split']} accuracy (n = {quality['n']}) against {fmt} speed-up", "",
             "| setting | accuracy | token agreement | speed-up | Pareto |", "| --- | ---: | ---: | ---: | :---: |"]
    for name, row in quality["settings"].items():
        s = speed[name]
        lines.append(f"| {name} | {row['overall']:.3f} | {row['token_agreement']:.3f} | "
                     f"{'—' if s is None else f'{s:.2f}×'} | {'●' if name in front else ''} |")
    return "\n".join(lines) + "\n"


def plot(quality: dict, speed: dict, front: set[str], out: Path, fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted((speed[n], quality["settings"][n]["overall"]) for n in quality["settings"]
                   if (n == "none" or n.startswith("steps-")) and speed[n] is not None)
    ax.plot(*zip(*steps), color="grey", linestyle="--", marker="s", label="fewer steps (baseline)")
    for name, row in quality["settings"].items():
        if speed[name] is None:
            continue
        ax.scatter(speed[name], row["overall"], color="tab:red" if name in front else "tab:blue", zorder=3)
        ax.annotate(name, (speed[name], row["overall"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"speed-up ({fmt}, composed per-step costs)")
    ax.set_ylabel(f"ShapeBench {quality['split']} accuracy")
    ax.set_title("Context reuse: red = Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", type=Path, required=True, help="reuse_quality.py JSON")
    p.add_argument("--speed", type=Path, nargs="+", required=True, help="bench_reuse.py JSONs")
    p.add_argument("--format", default="bf16", help="which format's speed-ups")
    p.add_argument("--out", type=Path, required=True, help="PNG path (.md beside it)")
    args = p.parse_args(argv)
    quality = read_json(args.quality)
    speed = speedups(quality, [read_json(path) for path in args.speed], args.format)
    front = pareto({n: (s, quality["settings"][n]["overall"]) for n, s in speed.items() if s is not None})
    plot(quality, speed, front, args.out, args.format)
    atomic_write_text(args.out.with_suffix(".md"), to_markdown(quality, speed, front, args.format))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
