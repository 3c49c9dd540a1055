"""One-shot GPU check: mgtq's CUDA tests, then the meissonic-1024 bench on the GPU (about 8 minutes).

    python benchmarks/gpu_check.py     # on a CUDA machine: benchmarks/results/gpu_<gpu>{,_bench}.{json,md}
    python benchmarks/gpu_check.py --smoke --out DIR   # anywhere (CPU): steps 2 and 3, tiny and fast
    python benchmarks/gpu_check.py --compile    # then, time permitting: the compiled cases beside the eager ones

Steps:
1. `pytest -m "cuda and not slow"` (tests marked `cuda` are skipped without a GPU; the `slow` ones compile
   whole models, past this check's budget): pass/fail/skip counts, and the last lines printed if it times out.
2. `mgtq bench` (`run_bench`) on meissonic-1024 with random weights: bf16 (and fp16 where the bench
   has it), w4a16, w4a8, scq and the torchao int4 weight-only / int8 peers; eager, transformer
   forward latency (interleaved rounds, the bench's default), the 48-step image,
   `torch.cuda.max_memory_allocated` (the bench's CUDA peaks).
3. The kernel each quantized layer kind gets on this device (`kernels.choose_kernel` at
   meissonic-1024's row counts, eager and compiled), so a reader sees which path the timings took.

The smoke mode runs steps 2 and 3 on the tiny-shapes model on CPU in-process (no pytest subprocess: CI
already runs the test suite) so that CI exercises this script end to end.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mgtq.bench import BenchConfig, MeasureSettings, run_bench
from mgtq.bench.config import FORMATS
from mgtq.bench.report import results_of
from mgtq.files import write_json

ROOT = Path(__file__).resolve().parent.parent
GPU_FORMATS = ("bf16", "fp16", "w4a16", "w4a8", "scq")
GPU_PEERS = ("torchao-w4a16-int4", "torchao-w8a16", "torchao-w8a8")
TIME_LIMIT_S = 8 * 60


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


CUDA_TESTS = ("-m", "cuda and not slow")  # the slow ones compile whole models: too long for this check's budget


def run_cuda_tests(timeout_s: float) -> dict:
    """`pytest -m "cuda and not slow"` in a subprocess: counts parsed from its summary line; on a timeout, the
    last lines it printed (which tests passed before it stopped)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=5", *CUDA_TESTS, "tests"]
    command = f"python -m pytest -q -rfE --durations=5 -m '{CUDA_TESTS[1]}' tests"
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        printed = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"command": command, "status": "timeout", "wall_s": time.perf_counter() - start,
                "summary": f"timed out after {timeout_s:.0f} s", "output_tail": printed.strip().splitlines()[-20:]}
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail)}
    return {"command": command, "returncode": proc.returncode, "summary": tail,
            "output_tail": proc.stdout.strip().splitlines()[-20:],
            "counts": counts, "wall_s": time.perf_counter() - start,
            "status": "ok" if proc.returncode in (0, 5) else "failed"}  # 5: nothing collected


def bench_config(smoke: bool, device: str, out: Path, name: str, model: str | None = None,
                 compile: bool = False) -> BenchConfig:
    formats = tuple(f for f in GPU_FORMATS if f in FORMATS)  # fp16 only once the bench offers it
    if smoke:
        return BenchConfig(model=model or "tiny-shapes", formats=("bf16", "w4a16"), device="cpu", threads=1,
                           isolation="none", json=str(out / f"gpu_{name}_bench.json"),
                           measure=MeasureSettings(warmup=0, repeats=1, steps=1, memory=False))
    return BenchConfig(model=model or "meissonic-1024", formats=formats, peers=GPU_PEERS, device=device,
                       json=str(out / f"gpu_{name}_bench.json"), compile=compile,
                       measure=MeasureSettings(warmup=1, repeats=3, steps=48, budget_s=20.0))


# Row counts of meissonic-1024's quantized layers: CFG batch × (1024 image + 77 text) tokens, and the
# adaLN / embedding projections (one row per sample); K = N = D = 1024 (per-channel scales).
KERNEL_ROWS = {"tokens": 2 * (1024 + 77), "adaLN": 2}


def kernel_choices(device: str) -> list[dict]:
    """choose_kernel's pick per scheme, row regime and compile setting on `device` (CPU class or GPU)."""
    from mgtq.quantization import kernels

    cpu_class = kernels.cpu_class() if torch.device(device).type == "cpu" else None
    # The opt-in W4A8 weight cache is oneDNN's prepacked weight only where kernels.weight_cache_backend
    # says so (amx-int8); elsewhere it is the plain int8 operand (the same kernel as without it).
    onednn_cache = cpu_class is not None and kernels.weight_cache_backend(cpu_class) == "onednn"
    rows = []
    for regime, m in KERNEL_ROWS.items():
        # the context a real call of M rows gets (device, CPU class, mgtq's own kernels, AVX512-BF16)
        x = torch.empty(m, 1024, dtype=torch.bfloat16, device=device)
        for compiling in (False, True):
            ctx = replace(kernels.context_for(x, k=1024, n=1024, group_size=1024), compiling=compiling)
            cached = replace(ctx, cache=onednn_cache)
            rows.append({"rows": regime, "m": m, "compiled": compiling, "cpu_class": ctx.cpu_class,
                         **{scheme: kernels.choose_kernel(scheme, ctx) for scheme in ("w4a16", "w4a8")},
                         "w4a8_cached": kernels.choose_kernel("w4a8", cached)})
    return rows


def summarize(report: dict) -> list[dict]:
    rows = []
    for r in results_of(report):
        cuda = (r.memory or {}).get("cuda_inference") or {}
        rows.append({"label": r.label, "status": r.status, "forward_s": r.forward_median,
                     "image_48_s": (r.image or {}).get("extrapolated_total_s"),
                     "forward_vs_bf16": report["ratios"].get(r.label, {}).get("forward_vs_bf16"),
                     "cuda_max_allocated_bytes": cuda.get("max_memory_allocated"), "message": r.message})
    return rows


def to_markdown(result: dict) -> str:
    lines = [f"# GPU check — {result['device_name']}", "",
             f"Command: `{result['command']}`; took {result['wall_s']:.0f} s.", ""]
    tests = result["tests"]
    lines += ["## CUDA tests", "", f"`{tests.get('command')}`: {tests.get('summary') or tests.get('status')}", ""]
    lines += ["## Bench", "", "| config | status | forward s | ×bf16 | 48-step image s | max allocated MB |",
              "|---|---|---:|---:|---:|---:|"]
    fmt = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for row in result["bench"]:
        mem = row["cuda_max_allocated_bytes"]
        lines.append(f"| {row['label']} | {row['status']} | {fmt(row['forward_s'])} | {fmt(row['forward_vs_bf16'], 2)} "
                     f"| {fmt(row['image_48_s'], 2)} | {'–' if mem is None else f'{mem / 1e6:,.0f}'} |")
    lines += ["", "## Kernels chosen (bf16 activations, K = N = 1024)", "",
              "| rows | M | compiled | CPU class | W4A16 | W4A8 | W4A8 + weight cache |", "|---|---:|---|---|---|---|---|"]
    for row in result["kernels"]:
        lines.append(f"| {row['rows']} | {row['m']} | {row['compiled']} | {row['cpu_class'] or '–'} | {row['w4a16']} "
                     f"| {row['w4a8']} | {row['w4a8_cached']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of steps 2 and 3 (what CI exercises)")
    parser.add_argument("--device", default="cuda", help="CUDA device (ignored with --smoke)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--model", default=None, help="bench model (default: meissonic-1024; tiny-shapes with --smoke)")
    parser.add_argument("--compile", action="store_true",
                        help="a second run's job: every case also under torch.compile (cold compiles take minutes)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --smoke for the CPU check, or on a GPU machine")
    start = time.perf_counter()
    device = "cpu" if args.smoke else args.device
    name = ("smoke" if args.smoke else slug(gpu_name(device))) + "_compiled" * args.compile
    args.out.mkdir(parents=True, exist_ok=True)
    tests = ({"command": "pytest " + " ".join(CUDA_TESTS), "status": "not run (smoke)"} if args.smoke
             else run_cuda_tests(timeout_s=TIME_LIMIT_S / 4))
    report = run_bench(bench_config(args.smoke, device, args.out, name, args.model, compile=args.compile))
    command = "python benchmarks/gpu_check.py" + " --smoke" * args.smoke + " --compile" * args.compile
    result = {"device_name": gpu_name(device), "command": command, "torch": torch.__version__,
              "cuda": torch.version.cuda,
              "tests": tests, "bench": summarize(report), "kernels": kernel_choices(device),
              "wall_s": time.perf_counter() - start,
              "time_limit_s": TIME_LIMIT_S}
    write_json(args.out / f"gpu_{name}.json", result)
    (args.out / f"gpu_{name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0 if tests.get("status") in ("ok", "not run (smoke)") else 1


if __name__ == "__main__":
    sys.exit(main())
