"""Cold and warm torch.compile start of the transformer: the same compile in two fresh processes.

    python benchmarks/compile_warm_start.py --model meissonic-1024 --formats bf16,scq --threads 1

Per format, two fresh interpreters share one mgtq cache folder (mgtq.compilation; a new temporary
folder unless --cache is given, so the first start is really cold). Each builds the transformer
(random weights), calls `compile_blocks()`, and times the first forward (compiling included) and then
`--repeats` more, in inference mode as the sampler calls it. Compile time = first forward − median of the
others. Reports the graphs Dynamo traced, Inductor's FX-graph cache and mgtq's precompiled blocks (loaded
or compiled: mgtq.compilation.PrecompiledBlocks), and the kernels. Writes
benchmarks/results/compile_warm_start_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys, time, torch
from mgtq.bench.build import build_transformer, linear_names_of
from mgtq.bench.source import forward_inputs, resolve_model, transformer_config
model, fmt, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
source = resolve_model(model)
scales = dict.fromkeys(linear_names_of(transformer_config(source)), 0.05)  # speed does not depend on them
transformer, _ = build_transformer(source, fmt, scales, 0, "cpu")
inputs = forward_inputs(source, torch.bfloat16, "cpu", seed=0)
start = time.perf_counter()
transformer.compile_blocks()
seconds = []
with torch.inference_mode():
    for i in range(1 + repeats):
        t = time.perf_counter()
        transformer(**inputs)
        seconds.append(time.perf_counter() - t)
from torch._dynamo.utils import counters
from mgtq.quantization.kernels import describe_kernels
store = transformer.precompiled
print(json.dumps({"first_forward_s": seconds[0], "forwards_s": seconds[1:],
                  "fxgraph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
                  "dynamo_graphs": counters["stats"]["unique_graphs"],
                  "precompiled": None if store is None else {k: store.counts[k] for k in ("loaded", "compiled")},
                  "kernels": describe_kernels("cpu")}))
"""


def run_once(model: str, fmt: str, threads: int, repeats: int, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["MGTQ_CACHE_DIR"] = str(cache)
    out = subprocess.run([sys.executable, "-c", _CHILD, model, fmt, str(threads), str(repeats)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{fmt}: the child failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["compile_s"] = record["first_forward_s"] - statistics.median(record["forwards_s"])
    return record


def to_markdown(report: dict) -> str:
    lines = [f"# torch.compile start, {report['model']} ({report['threads']} thread(s), load average "
             f"{report['loadavg_start']} → {report['loadavg_end']})", "",
             f"`{report['command']}`", "",
             "| format | start | first forward s | steady forward s | compile s (first − steady) | graphs traced "
             "| precompiled blocks | FX-graph cache |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for fmt, starts in report["formats"].items():
        for name, r in starts.items():
            lines.append(f"| {fmt} | {name} | {r['first_forward_s']:.1f} | {statistics.median(r['forwards_s']):.2f} | "
                         f"{r['compile_s']:.1f} | {r.get('dynamo_graphs', '')} | {r.get('precompiled')} | "
                         f"{r['fxgraph_cache']} |")
    kernels = next((r["kernels"] for starts in report["formats"].values() for r in starts.values() if "kernels" in r),
                   None)
    if kernels is not None:
        from mgtq.quantization.kernels import kernels_label

        lines += ["", f"Kernels: {kernels_label(kernels)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meissonic-1024")
    parser.add_argument("--formats", default="bf16,scq")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="steady forwards after the first")
    parser.add_argument("--cache", type=Path, default=None, help="mgtq cache folder (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (.md beside it)")
    args = parser.parse_args(argv)
    from mgtq.utils import atomic_write_text

    report = {"model": args.model, "threads": args.threads, "command": "python " + " ".join(
        ["benchmarks/compile_warm_start.py", *(argv if argv is not None else sys.argv[1:])]),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "formats": {}}
    with tempfile.TemporaryDirectory(prefix="mgtq-compile-cache-") as tmp:
        cache = args.cache or Path(tmp)
        for fmt in (f.strip() for f in args.formats.split(",") if f.strip()):
            report["formats"][fmt] = {start: run_once(args.model, fmt, args.threads, args.repeats, cache)
                                      for start in ("cold", "warm")}
            print(fmt, {k: round(v["compile_s"], 1) for k, v in report["formats"][fmt].items()}, flush=True)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or Path("benchmarks") / "results" / f"compile_warm_start_{args.model}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), to_markdown(report))
    print(to_markdown(report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
