"""Table of benchmarks/scq_groupwise_val.sh's results: accuracy and per-prompt wins / losses against
the default SCQ checkpoint (same prompts, same seeds)."""

import json
import sys
from pathlib import Path

ROWS = [("fp32", "float model"), ("default_scq", "SCQ default (per-channel, lowest third A8)"),
        ("g64_lowest_third", "SCQ group-64 A16 + lowest third A8 (tiny-shapes-w4g64a8-scq)"),
        ("g64_sensitivity_third", "SCQ group-64 A16 + sensitivity third A8")]


def main(folder: str = "benchmarks/results/scq_groupwise_val") -> None:
    folder = Path(folder)
    results = {key: json.loads((folder / f"{key}.json").read_text()) for key, _ in ROWS
               if (folder / f"{key}.json").is_file()}
    base = {(p["prompt"], p["seed"]): p["ok"] for p in results["default_scq"]["per_prompt"]}
    lines = ["| model | ShapeBench val (first 80) | wins / losses vs SCQ default |", "| --- | --- | --- |"]
    for key, label in ROWS:
        if key not in results:
            continue
        r = results[key]
        ok = {(p["prompt"], p["seed"]): p["ok"] for p in r["per_prompt"]}
        wins = sum(ok[k] and not base[k] for k in ok)
        losses = sum(base[k] and not ok[k] for k in ok)
        lines.append(f"| {label} | {r['overall']:.3f} (n={r['n']}) | {wins} / {losses} |")
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
