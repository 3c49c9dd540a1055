"""Attention on CPU at Meissonic's shapes: torch's SDPA against mgtq's kernel (on AMX tiles, and on AVX512-BF16
where the CPU has it), bf16, in interleaved rounds.

The evidence for `mgtq.fused.attention`'s choice. Shapes: CFG batch 2, 8 heads of 128, image + 77 text
tokens as the transformer runs them (Meissonic-1024: 1024 image tokens after the 2 x 2 feature
compression; Meissonic-512: 256), the same with TomeMGT's per-key bias, and context reuse's local steps
(few queries against every cached key). Each round times every variant once, in turn, the order rotated
from round to round; a cell is the median over rounds [min-max]; the ratio is the median of the per-round
ratios to SDPA. Inputs are laid out as the model makes them (q and k as (B, S, H, D) storage).

Usage::

    python benchmarks/bench_attention.py --threads 1 --rounds 11 --out benchmarks/results/attention_kernels_1thread
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from mgtq.files import atomic_write_text, write_json
from mgtq.native import amx
from mgtq.native.cpu import cpu_class

from bench_timing import interleaved_rounds, spread  # this folder's

# name, batch, heads, queries, keys, head dim, key bias
SHAPES = (
    ("Meissonic-1024 joint attention", 2, 8, 1101, 1101, 128, False),
    ("Meissonic-1024 + TomeMGT key bias", 2, 8, 1101, 1101, 128, True),
    ("Meissonic-512 joint attention", 2, 8, 333, 333, 128, False),
    ("reuse local step, 46 queries", 2, 8, 46, 1101, 128, False),
    ("reuse local step, 400 queries", 2, 8, 400, 1101, 128, False),
)


def inputs(b: int, h: int, sq: int, sk: int, d: int, bias: bool, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(b, sk, h, d, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(b, sk, h, d, generator=g).bfloat16().transpose(1, 2)
    key_bias = torch.randn(b, 1, 1, sk, generator=g).bfloat16() if bias else None
    return q, k, v, key_bias


def variants(q, k, v, key_bias) -> dict:
    fns = {"torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)}
    if amx.available() and amx.supports_attention(q, k, v, key_bias):
        fns["mgtq AMX"] = lambda: amx.attention(q, k, v, key_bias)
    if amx.avx512_bf16_available() and amx.supports_attention(q, k, v, key_bias):
        fns["mgtq AVX512-BF16"] = lambda: amx.attention(q, k, v, key_bias, tiles=False)
    return fns


def measure(shapes, rounds: int, warmup: int) -> list[dict]:
    rows = []
    for name, b, h, sq, sk, d, bias in shapes:
        with torch.no_grad():
            samples = interleaved_rounds(variants(*inputs(b, h, sq, sk, d, bias)), rounds, warmup)
        rows.append(dict(name=name, batch=b, heads=h, queries=sq, keys=sk, head_dim=d, key_bias=bias,
                         **spread(samples, base="torch SDPA")))
    return rows


def report(rows: list[dict], args) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["ms"]))
    lines = ["# Attention kernels at Meissonic's shapes (CPU, bf16)", "",
             f"{platform.machine()}, mgtq CPU class {cpu_class()}, mgtq AMX kernel "
             f"{'built' if amx.available() else 'not available'}, its AVX512-BF16 version "
             f"{'built' if amx.avx512_bf16_available() else 'not available'}, "
             f"torch {torch.__version__}, {args.threads} thread(s), "
             f"load average {[round(v, 2) for v in os.getloadavg()]}; {args.rounds} interleaved rounds, "
             "median ms [min–max]; × SDPA: median of per-round ratios [min–max].", "",
             "| shape (B, H, queries, keys, D) | " + " | ".join(f"{n} ms | × SDPA" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            if n not in r["ms"]:
                cells.append("– | –")
                continue
            cells.append(f"{r['ms'][n]:.2f} [{r['ms_min'][n]:.2f}–{r['ms_max'][n]:.2f}] | "
                         f"{r['ratio'][n]:.2f} [{r['ratio_min'][n]:.2f}–{r['ratio_max'][n]:.2f}]")
        shape = f"{r['batch']}, {r['heads']}, {r['queries']}, {r['keys']}, {r['head_dim']}"
        lines.append(f"| {r['name']} ({shape}) | " + " | ".join(cells) + " |")
    cmd = f"python benchmarks/bench_attention.py --threads {args.threads} --rounds {args.rounds}" + (
        f" --out {args.out}" if args.out else "")
    return "\n".join(lines) + f"\n\nCommand: `{cmd}`\n"


def main(argv: list[str] | None = None, shapes=SHAPES) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if min(args.rounds, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    rows = measure(shapes, args.rounds, args.warmup)
    text = report(rows, args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".md"), text)
        write_json(out.with_suffix(".json"), dict(rows=rows, threads=args.threads, rounds=args.rounds,
                                                  torch=torch.__version__, cpu_class=cpu_class()))
    print(text)
    return text


if __name__ == "__main__":
    main()
