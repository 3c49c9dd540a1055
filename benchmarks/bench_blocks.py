"""Block-level latency of Meissonic-1024 formats on CPU, eager and compiled, in interleaved rounds.

The unit a Meissonic-1024 forward repeats (14 multi-modal + 28 single-stream blocks): one MMDiTBlock
and one SingleStreamBlock at D = 1024 (8 heads x 128), 1024 image tokens + 77 text tokens, CFG
batch 2, random bf16 weights (speed does not depend on values), quantized like `mgtq bench`'s
formats: w4a16 every Linear W4Linear, w4a8 every Linear W4A8Linear, scq a seeded random third W4A8
and the rest W4A16; "-cached" adds the opt-in int8 weight cache (oneDNN prepacked on AMX/VNNI) to
the W4A8 layers. Every variant is built (and compiled, warmed up) first and held in this one
process; then round after round each variant times one call of both blocks in turn, so drift of
the machine lands on both sides of every ratio. A ratio is the median of the per-round ratios to
bf16 with the same compile setting, with its min-max.

Compiled variants: `torch.compile(fullgraph=True)` per block, as `MeissonicTransformer.compile_blocks`
does; `--inductor NAME=k:v,...` adds compiled bf16 variants with those Inductor options (e.g.
`freezing=freezing:1`, `autotune=max_autotune:1`), to try what Inductor ships.

Usage::

    python benchmarks/bench_blocks.py --threads 1 --rounds 7 --compile \\
        --formats bf16,w4a16,w4a8,scq,w4a8-cached,scq-cached --out benchmarks/results/blocks_meissonic-1024_1thread
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mgtq.bench.build import quantize_in_format_, with_weight_cache
from mgtq.bench.formats import Format
from mgtq.files import atomic_write_text, write_json
from mgtq.models.presets import PRESETS
from mgtq.models.transformer import MMDiTBlock, SingleStreamBlock, rope_tables
from mgtq.quantization import kernels, model_weight_nbytes

FORMATS = ("bf16", "w4a16", "w4a8", "scq", "w4a8-cached", "scq-cached")


@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]  # they sum to head_dim
    image_tokens: int = 1024
    text_tokens: int = 77
    batch: int = 2

    @classmethod
    def of_preset(cls, name: str, **sizes) -> "Shape":
        config = PRESETS[name]
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        return cls(heads * head_dim, heads, head_dim, tuple(config["axes_dims_rope"]), **sizes)


@dataclass
class Variant:
    name: str
    fmt: str
    compiled: str | None  # None eager; "default" or the name of an Inductor option set
    run: Callable[[], object]
    weight_bytes: int
    samples: list[float] = field(default_factory=list)


def block_inputs(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n, l, d = shape.batch, shape.image_tokens, shape.text_tokens, shape.dim
    side = int(n ** 0.5)
    ids = torch.zeros(l + n, 3)
    ids[l:, 1] = torch.arange(n).div(side, rounding_mode="floor").float()
    ids[l:, 2] = torch.arange(n).remainder(side).float()
    return dict(x=torch.randn(b, n, d, generator=g).to(torch.bfloat16),
                context=torch.randn(b, l, d, generator=g).to(torch.bfloat16),
                temb=torch.randn(b, d, generator=g).to(torch.bfloat16),
                rope=rope_tables(ids, shape.axes_dims_rope))


def build_blocks(shape: Shape, fmt: str, seed: int) -> nn.ModuleDict:
    """The two blocks in `fmt` (bf16 weights from `seed`, then quantized like mgtq bench's formats)."""
    torch.manual_seed(seed)
    blocks = nn.ModuleDict(dict(mm=MMDiTBlock(shape.dim, shape.heads, shape.head_dim),
                                single=SingleStreamBlock(shape.dim, shape.heads, shape.head_dim)))
    blocks = blocks.to(torch.bfloat16).eval().requires_grad_(False)
    parsed = Format.parse(fmt)
    if parsed.is_float:
        return blocks
    # int8 scales only decide clipping on random weights: one plausible value for every layer.
    quantize_in_format_(blocks, parsed, 0.05, seed)
    return with_weight_cache(blocks, [])[0] if parsed.cached else blocks


def runner(blocks: nn.ModuleDict, inputs: dict, n_text: int, compile_options: dict | None):
    mm, single = blocks["mm"], blocks["single"]
    if compile_options is not None:
        mm = torch.compile(mm, fullgraph=True, options=compile_options or None)
        single = torch.compile(single, fullgraph=True, options=compile_options or None)
    joint = torch.cat([inputs["context"], inputs["x"]], dim=1)

    def run():
        with torch.no_grad():
            mm(inputs["x"], inputs["context"], inputs["temb"], inputs["rope"])
            return single(joint, inputs["temb"], inputs["rope"], n_text)
    return run


def parse_option_sets(specs: list[str]) -> dict[str, dict]:
    """["freezing=freezing:1,cpp.weight_prepack:1"] -> {"freezing": {"freezing": True, ...}}."""
    sets = {}
    for spec in specs:
        name, _, body = spec.partition("=")
        if not name or not body:
            raise SystemExit(f"--inductor wants NAME=option:value[,option:value], got {spec!r}")
        options = {}
        for item in body.split(","):
            key, _, value = item.partition(":")
            options[key] = {"1": True, "0": False}.get(value, value)
        sets[name] = options
    return sets


def measure(variants: list[Variant], rounds: int, warmup: int) -> None:
    for v in variants:  # compile + warm up, untimed
        for _ in range(warmup):
            v.run()
    for _ in range(rounds):
        for v in variants:
            t0 = time.perf_counter()
            v.run()
            v.samples.append(time.perf_counter() - t0)


def ratios(v: Variant, base: Variant) -> list[float]:
    return [a / b for a, b in zip(v.samples, base.samples)]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def report(variants: list[Variant], args, shape: Shape) -> tuple[str, dict]:
    eager_bf16 = next(v for v in variants if v.fmt == "bf16" and v.compiled is None)
    compiled_bf16 = next((v for v in variants if v.fmt == "bf16" and v.compiled == "default"), None)
    rows, records = [], []
    for v in variants:
        base = eager_bf16 if v.compiled is None else compiled_bf16 or eager_bf16
        r = ratios(v, base)
        vs_eager = ratios(eager_bf16, v) if v.compiled is not None else None
        rows.append(f"| {v.name} | {v.weight_bytes / 1e6:.1f} | {summary([s * 1e3 for s in v.samples])} | "
                    f"{summary(r)} | {summary(vs_eager) if vs_eager else '–'} |")
        records.append(dict(name=v.name, format=v.fmt, compiled=v.compiled, weight_bytes=v.weight_bytes,
                            seconds=v.samples, ratio_to_bf16=statistics.median(r), ratio_min=min(r),
                            ratio_max=max(r), bf16_eager_over_this=statistics.median(vs_eager) if vs_eager else None))
    machine = (f"{platform.processor() or platform.machine()}, mgtq CPU class {kernels.cpu_class()}, "
               f"torch {torch.__version__}, {args.threads} thread(s), load average {_load()}")
    text = "\n".join([
        "# Meissonic-1024 blocks: latency by format, eager and compiled",
        "",
        f"One MMDiT block + one single-stream block, D = {shape.dim}, {shape.image_tokens} image + "
        f"{shape.text_tokens} text tokens, batch {shape.batch} (CFG). {machine}. {args.rounds} interleaved rounds "
        f"after {args.warmup} warm-up call(s); every variant held in one process.",
        "",
        "| variant | Linear weights MB | ms per call (median [min–max]) | × bf16, same compile setting | "
        "eager bf16 / this |",
        "|---|---:|---|---:|---:|",
        *rows,
        "",
        f"Command: `python benchmarks/bench_blocks.py {' '.join(args.argv)}`",
        "",
    ])
    return text, dict(machine=machine, shape=dict(shape.__dict__), rounds=args.rounds, variants=records)


def profile_table(variants: list[Variant]) -> tuple[str, dict]:
    """Markdown table + record of one profiled call per variant (bench_profile's categories).

    Inductor's generated C++ kernels are not profiler events: a compiled variant's fused elementwise
    work lands in "other" (the compiled region's own time), its GEMMs and attention stay named.
    """
    from mgtq.bench.lab import load_lab

    lab = load_lab("profile")  # benchmarks/bench_profile.py: the categories `mgtq bench --profile` uses
    CATEGORIES = lab.CATEGORIES
    profiles = {v.name: lab.profile_call(v.run) for v in variants}
    used = [c for c in CATEGORIES if any(p["split_fraction"][c] >= 0.005 for p in profiles.values())]
    lines = ["## Where a call's time goes (torch.profiler self time, fraction)", "",
             "| variant | total s | " + " | ".join(used) + " |", "|---|---:|" + "---:|" * len(used)]
    for name, p in profiles.items():
        cells = " | ".join(f"{p['split_fraction'][c]:.2f}" for c in used)
        lines.append(f"| {name} | {p['total_self_s']:.3f} | {cells} |")
    return "\n".join(lines) + "\n", profiles


def _load() -> str:
    try:
        return str([round(x, 2) for x in __import__("os").getloadavg()])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="bf16,w4a8,scq", help=f"comma list of {','.join(FORMATS)}")
    parser.add_argument("--compile", action="store_true", help="add a compiled variant of every format")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=opt:val,...",
                        help="extra compiled bf16 variant with these Inductor options (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one call per variant: self time by operator category")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke test of the script)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or "bf16" not in formats:
        raise SystemExit(f"--formats takes {','.join(FORMATS)} and must include bf16; got {args.formats!r}")
    torch.set_num_threads(args.threads)
    shape = (Shape(dim=64, heads=2, head_dim=32, axes_dims_rope=(8, 12, 12), image_tokens=16, text_tokens=5) if args.tiny
             else Shape.of_preset("meissonic-1024"))
    inputs = block_inputs(shape, args.seed)
    settings: list[tuple[str | None, dict | None]] = [(None, None)]
    if args.compile:
        settings.append(("default", {}))
    variants = []
    for compiled, options in settings:
        for fmt in formats:
            blocks = build_blocks(shape, fmt, args.seed)
            name = fmt + ("" if compiled is None else "+compile")
            variants.append(Variant(name, fmt, compiled, runner(blocks, inputs, shape.text_tokens, options),
                                    model_weight_nbytes(blocks)))
    for set_name, options in parse_option_sets(args.inductor).items():
        blocks = build_blocks(shape, "bf16", args.seed)
        variants.append(Variant(f"bf16+compile[{set_name}]", "bf16", set_name,
                                runner(blocks, inputs, shape.text_tokens, options), model_weight_nbytes(blocks)))
    measure(variants, args.rounds, args.warmup)
    text, record = report(variants, args, shape)
    if args.profile:
        profile_text, profiles = profile_table(variants)
        text += "\n" + profile_text
        record["profile"] = profiles
    if args.out is not None:
        atomic_write_text(args.out.with_suffix(".md"), text)
        write_json(args.out.with_suffix(".json"), record)
    print(text)
    return text


if __name__ == "__main__":
    main()
