"""Float linear kernels at Meissonic-1024's GEMM sizes on CPU: F.linear against oneDNN's linear, with and
without the MLP's tanh-GELU, bf16 and fp32, in interleaved rounds.

The evidence for `mgtq.fused.float_linear`'s choice (oneDNN for bf16, F.linear for fp32) and
for fusing the GELU into the GEMM epilogue. Rows: M = CFG batch 2 x (1024 image + 77 text) tokens;
(K, N) of the attention projections, the MLP's two layers and the single-stream block's output
projection. Each round times every variant once, in turn, the order rotated from round to round; a cell
is the median over rounds.

Usage::

    python benchmarks/bench_float_linear.py --threads 1 --rounds 7 --out benchmarks/results/float_linear_kernels
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from mgtq.files import atomic_write_text, write_json
from mgtq.quantization import kernels

from bench_timing import interleaved_rounds, spread  # this folder's

SHAPES = ((1024, 1024), (1024, 4096), (4096, 1024), (5120, 1024))  # (K, N)
ROWS = 2 * (1024 + 77)


def variants(dtype: torch.dtype, k: int, n: int, rows: int = ROWS, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    lp = torch.ops.mkldnn._linear_pointwise
    return {
        "F.linear": lambda: F.linear(x, w, b),
        "oneDNN linear": lambda: lp(x, w, b, "none", [], ""),
        "F.linear + GELU": lambda: F.gelu(F.linear(x, w, b), approximate="tanh"),
        "oneDNN linear+GELU": lambda: lp(x, w, b, "gelu", [], "tanh"),  # what mgtq.fused.float_linear runs in bf16
    }


def measure(rounds: int, warmup: int, m: int = ROWS) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for k, n in SHAPES:
            with torch.no_grad():
                samples = interleaved_rounds(variants(dtype, k, n, m), rounds, warmup)
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), k=k, n=n, **spread(samples)))
    return rows


def report(rows: list[dict], args) -> str:
    names = list(rows[0]["ms"])
    lines = ["# Float linear kernels at Meissonic-1024 sizes (CPU)", "",
             f"M = {args.rows} rows; {platform.machine()}, mgtq CPU class {kernels.cpu_class()}, torch {torch.__version__}, "
             f"{args.threads} thread(s), load average {[round(v, 2) for v in os.getloadavg()]}; "
             f"{args.rounds} interleaved rounds, median ms [min–max].", "",
             "| dtype | K × N | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for r in rows:
        cells = [f"{r['ms'][m]:.2f} [{r['ms_min'][m]:.2f}–{r['ms_max'][m]:.2f}]" for m in names]
        lines.append(f"| {r['dtype']} | {r['k']} × {r['n']} | " + " | ".join(cells) + " |")
    cmd = (f"python benchmarks/bench_float_linear.py --threads {args.threads} --rounds {args.rounds}"
           + (f" --rows {args.rows}" if args.rows != ROWS else "")
           + (f" --out {args.out}" if args.out else ""))
    return "\n".join(lines) + f"\n\nCommand: `{cmd}`\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=ROWS, help="GEMM rows M (default: CFG 2 x 1101 tokens)")
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if min(args.rounds, args.threads, args.rows) < 1 or args.warmup < 0:
        parser.error("--rounds, --threads and --rows must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    rows = measure(args.rounds, args.warmup, args.rows)
    text = report(rows, args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".md"), text)
        write_json(out.with_suffix(".json"), dict(rows=rows, threads=args.threads, rounds=args.rounds,
                                                  torch=torch.__version__, cpu_class=kernels.cpu_class()))
    print(text)
    return text


if __name__ == "__main__":
    main()
