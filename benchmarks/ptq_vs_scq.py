"""PTQ (`mgtq quantize`) W4A16 / W4A8 / SCQ-rule vs SCQ proper (`mgtq calibrate` + `mgtq export`) on ShapeBench test.

Rows: the float embedded model; `mgtq quantize --config w4a16`, `--config w4a16 --group-size 64`,
`--config w4a8` and `--config scq` (post-training, activation scales from ShapeBench *val* prompts); and an
SCQ checkpoint from a finished calibration run. Columns: ShapeBench accuracy per category, token agreement
with the float model at the same seeds, transformer Linear weight bytes, and the paired accuracy difference
against fp32 with its 95% interval (benchmarks/paired.py).

    mgtq calibrate && mgtq export calibration/tiny-shapes-w4a8-scq --out checkpoints/tiny-shapes-w4a8-scq
    python benchmarks/ptq_vs_scq.py --scq checkpoints/tiny-shapes-w4a8-scq            # full test split (320)
    python benchmarks/ptq_vs_scq.py --scq checkpoints/tiny-shapes-w4a8-scq --limit 8  # smoke run
    python benchmarks/ptq_vs_scq.py --render                                          # OUT.md again from OUT.json

Each PTQ checkpoint is written by the `mgtq quantize` command itself (under --work, reused if present).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mgtq.cli import main as mgtq_cli
from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline
from mgtq.files import atomic_write_text, read_json, write_json
from mgtq.pipeline import load
from mgtq.quantization import model_weight_nbytes
from mgtq.quantization.kernels import kernels_label
from mgtq.shapes import CATEGORIES

from paired import paired_cell, paired_or_none  # this folder's

REPO = Path(__file__).resolve().parent.parent
PTQ_ROWS = {  # row name: `mgtq quantize` flags
    "PTQ W4A16": ["--config", "w4a16"],
    "PTQ W4A16 g64": ["--config", "w4a16", "--group-size", "64"],
    "PTQ W4A8": ["--config", "w4a8"],
    "PTQ SCQ rule (no QAT)": ["--config", "scq"],
}


def quantized_checkpoint(model: Path, flags: list[str], out: Path, calibration_prompts: int) -> Path:
    """`mgtq quantize --model MODEL FLAGS --out OUT` unless OUT already holds that checkpoint."""
    if not (out / "transformer" / "manifest.json").is_file():
        argv = ["quantize", "--model", str(model), *flags, "--out", str(out), "--no-progress"]
        if "w4a16" not in flags:
            argv += ["--calibration-prompts", str(calibration_prompts)]
        if mgtq_cli(argv) != 0:
            raise SystemExit(f"mgtq {' '.join(argv)} failed")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="float pipeline folder (default: the embedded model)")
    p.add_argument("--scq", type=Path, default=None, help="SCQ checkpoint folder (mgtq export); omitted: no SCQ row")
    p.add_argument("--limit", type=int, default=None, help="first N ShapeBench test prompts (default: all 320)")
    p.add_argument("--calibration-prompts", type=int, default=32, help="ShapeBench val prompts for the A8 scales")
    p.add_argument("--work", type=Path, default=REPO / "calibration" / "ptq", help="where the PTQ checkpoints go")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ptq_vs_scq",
                   help="results path without suffix (.json and .md are written)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render", action="store_true", help="only rewrite OUT.json's paired comparisons and OUT.md "
                   "from OUT.json (no quantization or generation)")
    args = p.parse_args(argv)
    if args.render:
        write_results(args.out, read_json(args.out.with_suffix(".json")))
        return 0
    torch.set_num_threads(args.threads)

    model = args.model or default_model()
    rows = {"fp32": model}
    rows.update({name: quantized_checkpoint(model, flags, args.work / name.split(" (")[0].lower().replace(" ", "-"),
                                            args.calibration_prompts) for name, flags in PTQ_ROWS.items()})
    if args.scq is not None:
        rows["SCQ (mgtq calibrate)"] = args.scq

    results, reference = {}, None
    for name, path in rows.items():
        pipe = load(path, progress=False)
        result = evaluate_pipeline(pipe, limit=args.limit, progress=False, reference_tokens=reference)
        tokens = result.pop("tokens")
        reference = tokens if reference is None else reference
        result["ok"] = [row["ok"] for row in result.pop("per_prompt")]  # per prompt, for paired comparisons
        results[name] = {"model": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                         "linear_weight_bytes": model_weight_nbytes(pipe.transformer), **result}
        print(f"{name}: {result['overall']:.3f}")

    payload = {"split": "test", "limit": args.limit, "calibration_prompts": args.calibration_prompts,
               "command": " ".join(["python benchmarks/ptq_vs_scq.py", *(sys.argv[1:] if argv is None else argv)]),
               "rows": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, payload)
    return 0


def row_order(name: str) -> int:
    """fp32 first, then the PTQ rows, then SCQ: the order of a run (the JSON keeps the rows sorted by name)."""
    return 0 if name.startswith("fp32") else 1 + list(PTQ_ROWS).index(name) if name in PTQ_ROWS else 1 + len(PTQ_ROWS)


def with_paired(payload: dict) -> dict:
    """`payload` with each row's paired accuracy difference against fp32 on the same prompts (`paired_vs_fp32`,
    from the per-prompt verdicts; None where a side lacks them)."""
    reference = next(r for name, r in payload["rows"].items() if name.startswith("fp32")).get("ok")
    return {**payload, "rows": {name: {k: v for k, v in r.items() if k != "paired_vs_fp32"} if name.startswith("fp32")
                                else {**r, "paired_vs_fp32": paired_or_none(reference, r.get("ok"))}
                                for name, r in payload["rows"].items()}}


def to_markdown(payload: dict) -> str:
    results = dict(sorted(payload["rows"].items(), key=lambda item: row_order(item[0])))
    first = next(iter(results.values()))
    categories = sorted(first["per_category"], key=lambda c: (CATEGORIES + (c,)).index(c))  # ShapeBench's order
    lines = [f"ShapeBench test ({first['n']} prompts), `{payload['command']}`", "",
             *([f"Kernels: {kernels_label(first['kernels'])}", ""] if first.get("kernels") else []),
             "Δ vs fp32: paired accuracy difference on the same prompts and seeds, with its 95% interval "
             "(Newcombe's method 10).", "",
             "| row | overall | Δ vs fp32 [95% CI] | " + " | ".join(categories)
             + " | token agreement with fp32 | Linear weight MB |",
             "|---" * (len(categories) + 5) + "|"]
    for name, r in results.items():
        agreement = f"{r['token_agreement']:.3f}" if "token_agreement" in r else "—"
        versus = paired_cell(r["paired_vs_fp32"]) if "paired_vs_fp32" in r else ""
        lines.append(f"| {name} | {r['overall']:.3f} | {versus} | "
                     + " | ".join(f"{r['per_category'][c]:.3f}" for c in categories)
                     + f" | {agreement} | {r['linear_weight_bytes'] / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, payload: dict) -> None:
    """OUT.json and OUT.md from the measured rows (fp32 first)."""
    payload = with_paired(payload)
    write_json(out.with_suffix(".json"), payload)
    atomic_write_text(out.with_suffix(".md"), to_markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
