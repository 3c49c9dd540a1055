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
import statistics
from pathlib import Path

from mgtq.bench.latency import round_ratios

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


def _goal(name, description, value, op, target, spread=None, not_evaluated=None):
    """A goal row; `not_evaluated` (why) where the run has the case but no value for it."""
    if not_evaluated is not None:
        return {"name": name, "description": description, "value": None, "op": op, "target": target, "met": None,
                "miss": None, "spread": None, "not_evaluated": not_evaluated}
    if value is None:
        return None
    met = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
    return {"name": name, "description": description, "value": value, "op": op, "target": target, "met": met,
            "miss": 0.0 if met else abs(value - target) / target, "spread": spread, "not_evaluated": None}


def _why_not(result: dict | None) -> str | None:
    """Why a case of the run gives no value: failed or skipped (with its message); None where it ran."""
    if result is None or result["status"] == "ok":
        return None
    return f"{result['label']} {result['status']}" + (f": {result['message']}" if result.get("message") else "")


def _forward_ratio(mine: dict, theirs: dict) -> tuple[float | None, dict | None]:
    """mine / theirs forward latency as the ratio goals read it: the median of per-round ratios (interleaved
    rounds), else the ratio of the medians; None where either has no timed forward (a memory-only run)."""
    a, b = mine["latency"].get("forward"), theirs["latency"].get("forward")
    if not a or not b:
        return None, None
    per_round = round_ratios(a, b)
    if per_round:
        return statistics.median(per_round), {"min": min(per_round), "max": max(per_round), "rounds": len(per_round)}
    return a["median"] / b["median"], None


def goals(report: dict) -> list[dict]:
    ratios = report["ratios"]
    # Plain dicts, not CaseResult: results written by older mgtq versions carry other keys.
    by_label = {r["label"]: r for r in report["results"]}
    out = [_goal(n, d, ratios.get(label, {}).get(key), op, t, ratios.get(label, {}).get(key + "_spread"),
                 _why_not(by_label.get(label)) or _why_not(by_label.get("bf16")))
           for n, d, label, key, op, t in RATIO_GOALS]
    ok = {label: r for label, r in by_label.items() if r["status"] == "ok"}
    for label, r in ok.items():
        if r["tome"] == 0.5 and not r["offload"]:
            out.append(_goal(f"tome_speedup_{label}", f"{r['target']}: forward without merging / with TomeMGT 0.5 "
                             f"({r.get('tome_blocks', 'joint')} blocks)",
                             ratios[label].get("forward_speedup_vs_no_tome"), ">=", TOME_SPEEDUP,
                             ratios[label].get("forward_speedup_vs_no_tome_spread")))
    for suffix in ("", "+compile"):  # eager against eager, compiled against compiled
        mine = by_label.get("w4a8" + suffix)
        for peer in (p + suffix for p in W4A8_PEERS):
            if mine is None or peer not in by_label:
                continue
            why = _why_not(mine) or _why_not(by_label[peer])
            forward, spread = (None, None) if why else _forward_ratio(mine, by_label[peer])
            out.append(_goal(f"w4a8{suffix}_vs_{peer}_forward", f"mgtq w4a8{suffix} forward / {peer} forward",
                             forward, "<", 1.0, spread, why))
            if not suffix:  # the same bytes compiled or not
                weights = None if why else (mine["weights"]["transformer_bytes"]
                                            / by_label[peer]["weights"]["transformer_bytes"])
                out.append(_goal(f"w4a8_vs_{peer}_weights", f"mgtq w4a8 weight bytes / {peer} weight bytes",
                                 weights, "<", 1.0, None, why))
    return [g for g in out if g is not None]


def to_markdown(rows: list[dict]) -> str:
    lines = ["| goal | value | per-round min–max | target | met |", "|---|---:|---:|---:|---|"]
    for g in rows:
        if g["not_evaluated"]:
            lines.append(f"| {g['description']} | – | – | {g['op']} {g['target']:g} | not evaluated "
                         f"({g['not_evaluated']}) |")
            continue
        verdict = "yes" if g["met"] else f"**no** (off by {100 * g['miss']:.0f}%)"
        spread = g.get("spread")
        spread_text = f"{spread['min']:.3f}–{spread['max']:.3f} ({spread['rounds']} rounds)" if spread else "–"
        lines.append(f"| {g['description']} | {g['value']:.3f} | {spread_text} | {g['op']} {g['target']:g} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


# What must be the same for runs to be read side by side: the model, the machine's kernel class and threads, and
# every setting of the command but where its JSON went.
def _run_identity(report: dict) -> dict:
    return {"model": report["model"]["name"], "cpu_class": report["machine"].get("cpu_class"),
            "threads": report["machine"].get("torch_threads"),
            "settings": {k: v for k, v in report["settings"].items() if k != "json"}}


def check_same_command(reports: list[dict]) -> None:
    """Refuse runs that are not of one command on one kind of machine: their goals do not pool."""
    first = _run_identity(reports[0])
    for i, report in enumerate(reports[1:], 2):
        other = _run_identity(report)
        differ = [k for k in first if first[k] != other[k]]
        if differ:
            raise ValueError(f"run {i} differs from run 1 in {', '.join(differ)}: read side by side only runs of one "
                             "command on one kind of machine")


def across_runs(runs: list[list[dict]]) -> list[dict]:
    """One row per goal any run has, in first-seen order: its value in each run (None where a run has none), the
    min–max over all their rounds (a run without per-round spread counts its value) and in how many of the runs
    it is met."""
    names = list(dict.fromkeys(g["name"] for run in runs for g in run))
    rows = []
    for name in names:
        per_run = [next((g for g in run if g["name"] == name), None) for run in runs]
        seen = [g for g in per_run if g is not None and not g["not_evaluated"]]
        first = next(g for g in per_run if g is not None)
        lows = [g["spread"]["min"] if g.get("spread") else g["value"] for g in seen]
        highs = [g["spread"]["max"] if g.get("spread") else g["value"] for g in seen]
        rows.append({**first, "values": [g["value"] if g is not None else None for g in per_run],
                     "met_runs": sum(bool(g["met"]) for g in seen), "low": min(lows, default=None),
                     "high": max(highs, default=None), "rounds": sum(g["spread"]["rounds"] for g in seen
                                                                        if g.get("spread"))})
    return rows


def runs_to_markdown(rows: list[dict]) -> str:
    lines = ["| goal | value per run | min–max over all rounds | target | met in |", "|---|---:|---:|---:|---|"]
    for g in rows:
        values = ", ".join("–" if v is None else f"{v:.3f}" for v in g["values"])
        spread = f"{g['low']:.3f}–{g['high']:.3f} ({g['rounds']} rounds)" if g["rounds"] else "–"
        lines.append(f"| {g['description']} | {values} | {spread} | "
                     f"{g['op']} {g['target']:g} | {g['met_runs']} of {len(g['values'])} runs |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="JSON written by `mgtq bench`; several: runs of one "
                                                           "command, read side by side")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text()) for path in args.json]
    try:
        check_same_command(reports)
    except ValueError as err:
        parser.error(str(err))
    runs = [goals(report) for report in reports]
    print(to_markdown(runs[0]) if len(runs) == 1 else runs_to_markdown(across_runs(runs)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
