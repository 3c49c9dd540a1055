"""The project's goals for `mgtq bench`, checked against a bench JSON (goals are not library code).

    python benchmarks/bench_goals.py benchmarks/results/bench_meissonic-1024_1thread.json
    python benchmarks/bench_goals.py RUN1.json RUN2.json      # the same goals over runs of one command

Prints a Markdown table: each goal this run has data for, its value, its target and whether it is met.
Given several runs, each goal's value in each run, the min–max over every round of every run, and in how many
runs it is met: a bench keeps each config in one process across its rounds, so what a process's placement
costs it is in all its rounds and shows only between runs. The goals were set for meissonic-1024; on other
models they are for information.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_peers import W4A8_PEERS  # this folder's; mgtq's W4A8 must be faster and smaller than each of them

# (name, description, ratio label, ratio key, op, target): ratios are those of the bench JSON; forward
# ratios are the medians of per-round ratios when the bench ran interleaved rounds (its default).
RATIO_GOALS = (
    ("scq_weights", "SCQ transformer weights / bf16", "scq", "weights_vs_bf16", "<=", 0.28),
    ("scq_forward", "SCQ forward latency / bf16", "scq", "forward_vs_bf16", "<=", 0.85),
    ("w4a8_forward", "W4A8-everywhere forward latency / bf16", "w4a8", "forward_vs_bf16", "<=", 0.75),
    ("w4a16_forward", "W4A16 forward latency / bf16", "w4a16", "forward_vs_bf16", "<=", 1.0),
    ("compile_bf16_speedup", "bf16: eager forward / compiled forward", "bf16+compile", "forward_speedup_vs_eager",
     ">=", 2.0),
    ("compile_scq_forward", "compiled SCQ forward / compiled bf16", "scq+compile", "forward_vs_bf16", "<=", 0.75),
    ("compile_w4a8_forward", "compiled W4A8 forward / compiled bf16", "w4a8+compile", "forward_vs_bf16", "<=", 0.60),
    ("scq-cached_weights", "scq-cached transformer weights / bf16", "scq-cached", "weights_vs_bf16", "<=", 0.28),
    ("scq-cached_forward", "scq-cached forward latency / bf16", "scq-cached", "forward_vs_bf16", "<=", 0.85),
    ("w4a8-cached_forward", "w4a8-cached forward latency / bf16", "w4a8-cached", "forward_vs_bf16", "<=", 0.70),
    # The opt-in cache under --compile (oneDNN's int8 GEMM in the compiled graph): the compiled goals.
    ("compile_scq-cached_forward", "compiled scq-cached forward / compiled bf16", "scq-cached+compile",
     "forward_vs_bf16", "<=", 0.75),
    ("compile_w4a8-cached_forward", "compiled w4a8-cached forward / compiled bf16", "w4a8-cached+compile",
     "forward_vs_bf16", "<=", 0.60),
)
TOME_SPEEDUP = 1.4  # forward without merging / with TomeMGT 0.5


def _goal(name, description, value, op, target, spread=None):
    if value is None:
        return None
    met = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
    return {"name": name, "description": description, "value": value, "op": op, "target": target, "met": met,
            "miss": 0.0 if met else abs(value - target) / target, "spread": spread}


def _forward(result: dict) -> float:
    return result["latency"]["forward"]["median"]


def goals(report: dict) -> list[dict]:
    ratios = report["ratios"]
    out = [_goal(n, d, ratios.get(label, {}).get(key), op, t, ratios.get(label, {}).get(key + "_spread"))
           for n, d, label, key, op, t in RATIO_GOALS]
    # Plain dicts, not CaseResult: results written by older mgtq versions carry other keys.
    ok = {r["label"]: r for r in report["results"] if r["status"] == "ok"}
    for label, r in ok.items():
        if r["tome"] == 0.5 and not r["offload"]:
            out.append(_goal(f"tome_speedup_{label}", f"{r['target']}: forward without merging / with TomeMGT 0.5 "
                             f"({r.get('tome_blocks', 'joint')} blocks)",
                             ratios[label].get("forward_speedup_vs_no_tome"), ">=", TOME_SPEEDUP,
                             ratios[label].get("forward_speedup_vs_no_tome_spread")))
    mine = ok.get("w4a8")
    for peer in W4A8_PEERS:
        if mine is not None and peer in ok:
            out.append(_goal(f"w4a8_vs_{peer}_forward", f"mgtq w4a8 forward / {peer} forward",
                             _forward(mine) / _forward(ok[peer]), "<", 1.0))
            out.append(_goal(f"w4a8_vs_{peer}_weights", f"mgtq w4a8 weight bytes / {peer} weight bytes",
                             mine["weights"]["transformer_bytes"] / ok[peer]["weights"]["transformer_bytes"], "<", 1.0))
    return [g for g in out if g is not None]


def to_markdown(rows: list[dict]) -> str:
    lines = ["| goal | value | per-round min–max | target | met |", "|---|---:|---:|---:|---|"]
    for g in rows:
        verdict = "yes" if g["met"] else f"**no** (off by {100 * g['miss']:.0f}%)"
        spread = g.get("spread")
        spread_text = f"{spread['min']:.3f}–{spread['max']:.3f} ({spread['rounds']} rounds)" if spread else "–"
        lines.append(f"| {g['description']} | {g['value']:.3f} | {spread_text} | {g['op']} {g['target']:g} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def across_runs(runs: list[list[dict]]) -> list[dict]:
    """One row per goal of the first run: its value in every run that has it, the min–max over all their rounds
    (a run without per-round spread counts its value) and how many of those runs meet it."""
    rows = []
    for first in runs[0]:
        seen = [g for run in runs for g in run if g["name"] == first["name"]]
        lows = [g["spread"]["min"] if g.get("spread") else g["value"] for g in seen]
        highs = [g["spread"]["max"] if g.get("spread") else g["value"] for g in seen]
        rows.append({**first, "values": [g["value"] for g in seen], "met_runs": sum(g["met"] for g in seen),
                     "low": min(lows), "high": max(highs),
                     "rounds": sum(g["spread"]["rounds"] for g in seen if g.get("spread"))})
    return rows


def runs_to_markdown(rows: list[dict]) -> str:
    lines = ["| goal | value per run | min–max over all rounds | target | met in |", "|---|---:|---:|---:|---|"]
    for g in rows:
        values = ", ".join(f"{v:.3f}" for v in g["values"])
        spread = f"{g['low']:.3f}–{g['high']:.3f} ({g['rounds']} rounds)" if g["rounds"] else "–"
        lines.append(f"| {g['description']} | {values} | {spread} | "
                     f"{g['op']} {g['target']:g} | {g['met_runs']} of {len(g['values'])} runs |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="JSON written by `mgtq bench`; several: runs of one "
                                                           "command, read side by side")
    args = parser.parse_args(argv)
    runs = [goals(json.loads(path.read_text())) for path in args.json]
    print(to_markdown(runs[0]) if len(runs) == 1 else runs_to_markdown(across_runs(runs)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
