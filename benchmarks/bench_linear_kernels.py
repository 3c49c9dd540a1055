"""Latency of the quantized linear kernels on Meissonic-1024 shapes (CPU).

One single-stream transformer block of Meissonic-1024 (D = 1024) has these
Linears; tokens M = 2 x (1024 + 77) = 2202 for the classifier-free-guidance
batch of 2 (the adaLN projection sees one row per sample):

    norm.linear (adaLN)  1024 -> 3072   M = 2
    attn.to_q/k/v        1024 -> 1024   M = 2202   (x3)
    proj_mlp             1024 -> 4096   M = 2202
    proj_out             5120 -> 1024   M = 2202

Variants: fp32 ``F.linear``; bf16 through mgtq's float Linear (oneDNN's linear on
x86: the baseline of every ratio) and through ``F.linear``; ``W4Linear`` and
``W4A8Linear`` as dispatched by :mod:`mgtq.quantization.kernels` ("W4A16", "W4A8"),
and every candidate CPU kernel of that dispatch forced on each shape (the evidence
for its choice table): W4A16 dequantize + bf16 GEMM, ``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu`` (its layout prepared beforehand, untimed), mgtq's own W4A16 kernels
(``A16 amx`` on AMX-int8 CPUs, ``A16 avx512`` on AVX512-BF16 CPUs, with a C++ compiler); W4A8
``_int_mm`` chunked by 256 columns, one ``_int_mm`` for the whole layer, the exact
``_weight_int8pack_mm`` path, mgtq's own AMX kernel (``A8 amx``: AMX-int8 CPUs with a
C++ compiler, :mod:`mgtq.native.amx`), its AVX512-VNNI kernel (``A8 vnni``: VNNI CPUs with a C++
compiler), and the opt-in oneDNN int8 weight cache.
Variants are timed round-robin (one call of each in turn, repeated; bench_timing.py)
so background load hits all of them alike; we report medians.

Usage::

    python benchmarks/bench_linear_kernels.py --threads 2 --repeats 15 [--out results.md]

Another CPU class's kernels on this machine: ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`` (no AMX) or
``AVX2`` caps oneDNN (which runs the bf16 GEMMs, ``_int_mm`` and the oneDNN int8 linear), with
``MGTQ_CPU_CLASS`` set to the matching class for mgtq's dispatch.

On a shared machine (other jobs on the cores) multi-threaded timings are
dominated by OpenMP barriers waiting for a descheduled thread, which punishes
kernels made of many small ops far more than one big GEMM; ``--threads 1
--stat min`` then gives the least-disturbed per-core cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mgtq.files import atomic_write_text
from mgtq.quantization import W4A8Linear, W4Linear, choose_int8_scale
from mgtq.fused import float_linear
from mgtq.native import amx
from mgtq.quantization import kernels

from bench_timing import interleaved_rounds  # this folder's

D = 1024
STATS = {"median": statistics.median, "min": min}
TEXT_TOKENS = 77
IMAGE_TOKENS = 1024  # 64 x 64 latent downsampled 2x -> 32 x 32


@dataclass(frozen=True)
class LayerShape:
    name: str
    in_features: int
    out_features: int
    rows: int  # M
    count: int = 1  # how many such layers per block


def block_shapes(batch: int, tokens: int) -> list[LayerShape]:
    m = batch * tokens
    return [
        LayerShape("adaLN 1024->3072", D, 3 * D, batch),
        LayerShape("to_q/k/v 1024->1024", D, D, m, count=3),
        LayerShape("proj_mlp 1024->4096", D, 4 * D, m),
        LayerShape("proj_out 5120->1024", 5 * D, D, m),
    ]


VARIANTS = ("fp32", "bf16", "bf16 F.linear", "W4A16", "A16 dequant", "A16 int8pack", "A16 int4pack_cpu", "A16 amx",
            "A16 avx512", "W4A8",
            "A8 int_mm chunked", "A8 int_mm one call", "A8 int8pack exact", "A8 amx", "A8 vnni", "W4A8+onednn")


def make_variants(shape: LayerShape, seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(shape.in_features, shape.out_features)
    with torch.no_grad():
        linear.weight.normal_(0, shape.in_features**-0.5, generator=g)
        linear.bias.normal_(0, 0.02, generator=g)
    x32 = torch.randn(shape.rows, shape.in_features, generator=g)
    xbf = x32.bfloat16()
    w32, b32 = linear.weight.detach(), linear.bias.detach()
    wbf, bbf = w32.bfloat16(), b32.bfloat16()
    w4 = W4Linear.from_float(linear).to(torch.bfloat16)
    w4a8 = W4A8Linear.from_float(linear, choose_int8_scale(x32.abs().max())).to(torch.bfloat16)
    w4a8_cached = W4A8Linear.from_float(linear, choose_int8_scale(x32.abs().max())).to(torch.bfloat16)
    w4a8_cached.enable_weight_cache("onednn")
    w4_layout = kernels.tinygemm_operands(w4.weight_packed, w4.weight_scale)
    w4_cpu = torch._convert_weight_to_int4pack_for_cpu(w4_layout[0], 1)
    a8 = (w4a8.weight_packed, w4a8.weight_scale, w4a8.input_scale, w4a8.bias)
    variants = {
        "fp32": lambda: F.linear(x32, w32, b32),
        "bf16": lambda: float_linear(xbf, wbf, bbf),  # what mgtq's float Linear runs (oneDNN on x86)
        "bf16 F.linear": lambda: F.linear(xbf, wbf, bbf),
        "W4A16": lambda: w4(xbf),
        "A16 dequant": lambda: F.linear(xbf, kernels.dequantize_int4_op(w4.weight_packed, w4.weight_scale,
                                                                        torch.bfloat16), bbf),
        "A16 int8pack": lambda: torch._weight_int8pack_mm(xbf, kernels.unpack_int4_op(w4.weight_packed),
                                                          w4.weight_scale[:, 0].bfloat16()) + bbf,
        "A16 int4pack_cpu": lambda: torch._weight_int4pack_mm_for_cpu(xbf, w4_cpu, w4_layout[2], w4_layout[1]) + bbf,
        "W4A8": lambda: w4a8(xbf),
        "A8 int_mm chunked": lambda: _forced(w4a8, xbf, "int_mm_chunked"),
        "A8 int_mm one call": lambda: kernels.rescale_acc(
            torch._int_mm(kernels.quantize_int8_rows(xbf, a8[2]), kernels.unpack_int4_times16_op(a8[0]).t()),
            a8[1], a8[2], a8[3], torch.bfloat16, 1.0 / 16.0),
        "A8 int8pack exact": lambda: _forced(w4a8, xbf, "int8pack_exact"),
        "W4A8+onednn": lambda: w4a8_cached(xbf),
    }
    if amx.available():  # mgtq's own AMX kernels: AMX-int8 CPUs with a C++ compiler only
        variants["A8 amx"] = lambda: _forced(w4a8, xbf, "amx")
        variants["A16 amx"] = lambda: _forced(w4, xbf, "amx")
    if amx.avx512_bf16_available():  # mgtq's own AVX512-BF16 W4A16 kernel
        variants["A16 avx512"] = lambda: _forced(w4, xbf, "avx512")
    if amx.vnni_available():  # mgtq's own AVX512-VNNI kernel: VNNI CPUs (AMX ones included) with a C++ compiler
        variants["A8 vnni"] = lambda: _forced(w4a8, xbf, "vnni")
    return variants


def _quoted(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def _forced(layer: torch.nn.Module, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """A quantized layer run through one named kernel of the dispatch, whatever the dispatch would pick."""
    original = kernels.choose_kernel
    kernels.choose_kernel = lambda scheme, ctx: kernel
    try:
        return layer(x)
    finally:
        kernels.choose_kernel = original


def time_round_robin(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, stat: Callable = statistics.median
) -> dict[str, float]:
    """Milliseconds per variant (median by default), variants interleaved call by call in a fixed order."""
    with torch.inference_mode():
        samples = interleaved_rounds(fns, repeats, warmup, rotate=False)
    return {k: stat(v) for k, v in samples.items()}


def markdown_table(rows: list[tuple[str, dict[str, float]]], variants: list[str]) -> str:
    head = "| layer | " + " | ".join(f"{v} ms (x bf16)" for v in variants) + " |"
    sep = "|---|" + "---|" * len(variants)
    lines = [head, sep]
    for name, t in rows:
        cells = [f"{t[v]:.2f} ({t[v] / t['bf16']:.2f}x)" for v in variants]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="CFG batch (2 = cond + uncond)")
    ap.add_argument("--tokens", type=int, default=IMAGE_TOKENS + TEXT_TOKENS)
    ap.add_argument(
        "--stat", choices=["median", "min"], default="median", help="min = least-disturbed run on a busy machine"
    )
    ap.add_argument("--out", type=str, default=None, help="also write the Markdown report here")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of the variants to time (bf16 is always timed: ratios are to it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    wanted = {v.strip() for v in args.variants.split(",")} | {"bf16"}
    if wanted - set(VARIANTS):
        raise SystemExit(f"unknown --variants {sorted(wanted - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    if not amx.available():
        wanted -= {"A8 amx", "A16 amx"}
    if not amx.avx512_bf16_available():
        wanted.discard("A16 avx512")
    if not amx.vnni_available():
        wanted.discard("A8 vnni")
    variants = [v for v in VARIANTS if v in wanted]
    rows: list[tuple[str, dict[str, float]]] = []
    block = {v: 0.0 for v in variants}
    for shape in block_shapes(args.batch, args.tokens):
        candidates = {name: fn for name, fn in make_variants(shape).items() if name in wanted}
        t = time_round_robin(candidates, args.repeats, args.warmup, STATS[args.stat])
        label = f"{shape.name} (M={shape.rows})" + (f", per layer (x{shape.count} in block)" if shape.count > 1 else "")
        rows.append((label, t))
        for v in variants:
            block[v] += shape.count * t[v]
    rows.append(("**block total (6 Linears)**", block))
    # SCQ: 1/3 of the Linears get int8 activations (chosen by activation
    # magnitude, so which ones varies); expected cost = 1/3 A8 + 2/3 A16.
    if {"W4A16", "W4A8", "W4A8+onednn"} <= wanted:
        mix = {v: block[v] for v in variants}
        mix["W4A16"] = mix["W4A8"] = block["W4A8"] / 3 + 2 * block["W4A16"] / 3
        mix["W4A8+onednn"] = block["W4A8+onednn"] / 3 + 2 * block["W4A16"] / 3
        rows.append(("**SCQ mix, expected (1/3 A8, 2/3 A16)**", mix))

    report = [
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"mgtq CPU class {kernels.cpu_class()} (mgtq.quantization.kernels), "
        f"oneDNN ISA limit {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}, "
        f"{args.stat} of {args.repeats} round-robin repeats after {args.warmup} warm-ups, "
        f"batch {args.batch} x {args.tokens} tokens.",
        "",
        markdown_table(rows, variants),
        "",
        "W4A16 / W4A8 = W4Linear / W4A8Linear on bf16 activations with mgtq's kernel dispatch "
        "(mgtq.quantization.kernels); A16 * / A8 * = one candidate kernel forced on every shape; "
        "+onednn = opt-in enable_weight_cache('onednn'): int8 weight prepacked for oneDNN's fused int8 linear. "
        "SCQ-mix row: the W4A16 and W4A8 columns both show 1/3 W4A8 + 2/3 W4A16, "
        "the +onednn column 1/3 W4A8+onednn + 2/3 W4A16. bf16 = mgtq's float Linear (oneDNN's linear on x86), "
        "bf16 F.linear = torch's.",
        "",
        "Command: `python " + " ".join(["benchmarks/bench_linear_kernels.py", *map(_quoted, sys.argv[1:])]) + "`",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
