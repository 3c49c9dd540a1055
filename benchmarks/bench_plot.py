"""`mgtq bench`'s chart: weight MB, peak RSS MB and forward seconds of every case, as a PNG.

    python benchmarks/bench_plot.py bench_meissonic-1024.json      # writes bench_meissonic-1024.png

`mgtq bench --plot` calls `write_png` on the report it has just written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mgtq.bench.result import MB, CaseResult
from mgtq.config import read_mapping
from mgtq.files import atomic_file

_COLORS = {"mgtq": "#1f77b4", "optimum-quanto": "#ff7f0e", "torchao": "#2ca02c"}


def plot_png(report: dict, path: Path) -> None:
    """Three horizontal bar charts: weight MB, inference peak RSS MB, forward median s (min–max whiskers); each
    bar's ratio is to bf16, a compiled case's to compiled bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in map(CaseResult.from_dict, report["results"]) if r.ok]
    labels = [r.label for r in ok]
    colors = [_COLORS.get(r.family, "#7f7f7f") for r in ok]
    # the inference peak (after the build, its heap returned): what running needs; a peer's process peak also
    # holds the bf16 model it quantized in place, which a user loading a quantized checkpoint never builds
    inference = [(r.memory or {}).get("peak_rss_inference") or r.peak_rss or 0 for r in ok]
    panels = [("transformer weights (MB)", [(r.weight_bytes or 0) / MB for r in ok], None),
              ("inference peak RSS (MB)", [v / MB for v in inference], None)]
    medians = [r.forward_median or 0.0 for r in ok]
    errors = [[m - (r.forward or {}).get("min", m) for m, r in zip(medians, ok)],
              [(r.forward or {}).get("max", m) - m for m, r in zip(medians, ok)]]
    panels.append(("transformer forward, CFG batch 2 (s, median)", medians, errors))
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.42 * len(ok) + 1.8), sharey=True)
    ys = list(range(len(ok)))
    for ax, (title, values, err) in zip(axes, panels):
        ax.barh(ys, values, color=colors, xerr=err, capsize=2)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        by_label = dict(zip(labels, values))
        for y, v, r in zip(ys, values, ok):
            ref = by_label.get("bf16+compile" if r.compile else "bf16")  # compiled against compiled, as the table
            if ref and v:
                ax.text(v, y, f" {v / ref:.2f}×", va="center", fontsize=7)
    axes[0].set_yticks(ys, labels, fontsize=8)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    fig.legend(handles, list(_COLORS), loc="lower center", ncol=3, fontsize=8, frameon=False)
    threads = report["machine"]["torch_threads"]
    fig.suptitle(f"mgtq bench — {report['model']['name']} ({threads} thread{'s' if threads != 1 else ''}, "
                 f"{report['machine']['device']}, load avg {report['machine']['loadavg_start']}); ratios vs bf16 "
                 "(compiled cases: vs compiled bf16)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_png(report: dict, path: Path) -> None:
    """The chart at `path`, through mgtq's one file writer (never over a device, FIFO or link target)."""
    with atomic_file(path) as tmp:
        plot_png(report, tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a JSON written by `mgtq bench`")
    args = parser.parse_args(argv)
    write_png(read_mapping(args.json, "bench JSON"), args.json.with_suffix(".png"))
    print(f"wrote {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
