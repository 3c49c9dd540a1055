"""Cold and warm torch.compile start of the transformer: the same compile in two fresh processes.

    python benchmarks/compile_warm_start.py --model meissonic-1024 --formats bf16,scq --threads 1
    python benchmarks/compile_warm_start.py --model meissonic-1024 --formats bf16,scq --threads 1 \
        --sampler fast --steps 48 --compare-plain
    python benchmarks/compile_warm_start.py --model meissonic-1024 --formats bf16,scq --threads 1 --tome 0.5

Per format, two fresh interpreters share one mgtq cache folder (mgtq.compilation; a new temporary
folder unless --cache is given, so the first start is really cold). Each builds the transformer
(random weights), calls `compile_blocks()`, and times a first pass (compiling included) and then
`--repeats` more, in inference mode as the sampler calls it. A pass is one forward, or with `--sampler`
(a preset with context reuse), the step kinds of one `--steps`-step image: the full step and each
distinct local step (bench_reuse's schedule); with `--tome RATIO`, three forwards under TomeMGT (its default
settings at that ratio) at masked fractions 0.75, 0.5 and 0.25, so the decoded schedule merges three different
token counts. Compile time = first pass − median of the others. Reports
the graphs Dynamo traced, Inductor's FX-graph cache and mgtq's precompiled blocks (loaded or compiled:
mgtq.compilation.PrecompiledBlocks), and the kernels. `--compare-plain`: the warm process then compiles
a copy of the model with plain torch.compile (no cache: Dynamo's own recompiles) and times both, call
by call in `--repeats` interleaved rounds (the order alternating), to tell whether the precompiled
code runs as fast. Writes benchmarks/results/compile_warm_start_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def step_calls(transformer, source, sampler: str | None, steps: int, tome: float = 0.0) -> list[tuple[str, object]]:
    """The calls one start times, in order: the sampler's forward (no sampler), or with `sampler`, the step
    kinds of one `steps`-step image under its context reuse: the full step and each distinct local step
    (bench_reuse's schedule: the sampler's counts, random positions); with `tome` > 0, forwards under TomeMGT
    at three masked fractions (random positions masked), each at its own sampler step."""
    from mgtq.bench.source import forward_inputs, token_grid

    if tome:
        from mgtq.merging import TomeConfig, TomePlan

        plan, inputs = TomePlan(TomeConfig(ratio=tome)), forward_inputs(source, torch.bfloat16, "cpu", seed=0)
        calls = []
        for step, fraction in enumerate((0.75, 0.5, 0.25)):
            ids = inputs["hidden_states"].clone()
            flat = ids.view(ids.shape[0], -1)
            order = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(step))
            flat[:, order[:round(fraction * flat.shape[1])]] = transformer.mask_token_id
            masked = {**inputs, "hidden_states": ids}
            calls.append((f"tome{fraction}", lambda m=masked, k=step: transformer(**m, token_hook=plan.at_step(k))))
        return calls
    if sampler is None:
        inputs = forward_inputs(source, torch.bfloat16, "cpu", seed=0)
        return [("forward", lambda: transformer(**inputs))]
    from bench_reuse import Case, local_sets, schedule_plan

    from mgtq.sampling import SamplerConfig

    config = SamplerConfig.preset(sampler, num_steps=steps)  # main() checked that it has context reuse
    grid = tuple(token_grid(source))
    case = Case(transformer, grid, 0, config.reuse.bucket)
    sets = local_sets(schedule_plan(config, grid, 0))
    locals_ = [(f"local{k}", lambda a=item["active"]: case.local(a)) for k, item in enumerate(sets)]
    return [("full", case.full), *locals_]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def child_main(argv: list[str]) -> None:
    """One start in a fresh process (run_once): build, compile_blocks(), time the first pass and `repeats` more;
    with compare, then time a twin compiled with plain torch.compile against it in interleaved rounds."""
    from torch._dynamo.utils import counters

    from mgtq.bench.build import build_transformer, linear_names_of
    from mgtq.bench.source import resolve_model, transformer_config
    from mgtq.quantization.kernels import describe_kernels

    model, fmt, threads, repeats, sampler, steps, compare, tome = argv
    repeats, steps, compare, sampler, tome = int(repeats), int(steps), compare == "1", sampler or None, float(tome)
    torch.set_num_threads(int(threads))
    source = resolve_model(model)
    scales = dict.fromkeys(linear_names_of(transformer_config(source)), 0.05)  # speed does not depend on them
    transformer, _ = build_transformer(source, fmt, scales, 0, "cpu")
    twin = copy.deepcopy(transformer) if compare else None
    transformer.compile_blocks()
    with torch.inference_mode():
        calls = step_calls(transformer, source, sampler, steps, tome)
        passes = [{name: _timed(fn) for name, fn in calls} for _ in range(1 + repeats)]
        store = transformer.precompiled
        record = {"first_pass_s": passes[0], "passes_s": passes[1:],
                  "fxgraph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
                  "dynamo_graphs": counters["stats"]["unique_graphs"],
                  "precompiled": None if store is None else dict(store.counts),
                  "kernels": describe_kernels("cpu")}
        if compare:
            twin.compile_blocks(persistent_cache=False)
            twin_calls = step_calls(twin, source, sampler, steps, tome)
            record["plain_first_pass_s"] = {name: _timed(fn) for name, fn in twin_calls}
            rounds = []
            for r in range(repeats):  # interleaved call by call, the order alternating from round to round
                row = {}
                for (name, fn), (_, twin_fn) in zip(calls, twin_calls):
                    first, second = (fn, twin_fn) if r % 2 == 0 else (twin_fn, fn)
                    a, b = _timed(first), _timed(second)
                    row[name] = (a, b) if r % 2 == 0 else (b, a)
                rounds.append(row)
            record["versus_plain"] = rounds  # per round, per call: (precompiled s, plain torch.compile s)
    print(json.dumps(record))


def run_once(model: str, fmt: str, threads: int, repeats: int, cache: Path, sampler: str | None = None,
             steps: int = 48, compare: bool = False, tome: float = 0.0) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["MGTQ_CACHE_DIR"] = str(cache)
    child = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); " \
            "from compile_warm_start import child_main; child_main(sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", child, model, fmt, str(threads), str(repeats), sampler or "",
                          str(steps), "1" if compare else "0", str(tome)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{fmt}: the child failed:\n{out.stderr[-3000:]}")
    return summarize(json.loads(out.stdout.strip().splitlines()[-1]))


def summarize(record: dict) -> dict:
    """A child's record with compile_s (first pass − median steady pass) and, with --compare-plain, the per-round
    ratios of pass times, precompiled ÷ plain torch.compile: their median, min and max."""
    record["compile_s"] = sum(record["first_pass_s"].values()) - statistics.median(
        sum(p.values()) for p in record["passes_s"])
    if "versus_plain" in record:
        ratios = [sum(a for a, _ in row.values()) / sum(b for _, b in row.values()) for row in record["versus_plain"]]
        record["versus_plain_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return record


def to_markdown(report: dict) -> str:
    what = "one forward" if report.get("sampler") is None else \
        f"the full and local steps of one {report['steps']}-step image, sampler {report['sampler']}"
    if report.get("tome"):
        what = f"three forwards under TomeMGT ratio {report['tome']}, masked fractions 0.75, 0.5, 0.25"
    lines = [f"# torch.compile start, {report['model']} ({report['threads']} thread(s), load average "
             f"{report['loadavg_start']} → {report['loadavg_end']})", "",
             f"`{report['command']}`", "", f"A pass: {what}.", "",
             "| format | start | first pass s | steady pass s | compile s (first − steady) | graphs traced "
             "| precompiled blocks | FX-graph cache |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    versus = []
    for fmt, starts in report["formats"].items():
        for name, r in starts.items():
            steady = statistics.median(sum(p.values()) for p in r["passes_s"])
            lines.append(f"| {fmt} | {name} | {sum(r['first_pass_s'].values()):.1f} | {steady:.2f} | "
                         f"{r['compile_s']:.1f} | {r.get('dynamo_graphs', '')} | {r.get('precompiled')} | "
                         f"{r['fxgraph_cache']} |")
            if "versus_plain_ratio" in r:
                v = r["versus_plain_ratio"]
                versus.append(f"- {fmt}, {name} start: a pass with the precompiled blocks takes {v['median']:.3f}× "
                              f"[{v['min']:.3f}–{v['max']:.3f}] the time with plain torch.compile "
                              f"({len(r['versus_plain'])} interleaved rounds; plain torch.compile's first pass "
                              f"{sum(r['plain_first_pass_s'].values()):.1f} s)")
    if versus:
        lines += ["", "Precompiled against plain torch.compile, in the warm process (median [min–max] of per-round "
                  "ratios of pass times):", "", *versus]
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
    parser.add_argument("--repeats", type=int, default=2, help="steady passes after the first")
    parser.add_argument("--sampler", default=None, help="a sampler preset with context reuse (e.g. fast): time the "
                        "step kinds of one image instead of one forward")
    parser.add_argument("--steps", type=int, default=48, help="sampler steps of that image (with --sampler)")
    parser.add_argument("--compare-plain", action="store_true", help="the warm start also times plain torch.compile "
                        "against the precompiled blocks, interleaved")
    parser.add_argument("--tome", type=float, default=0.0, help="TomeMGT ratio: time forwards under token merging "
                        "at three masked fractions instead of one plain forward")
    parser.add_argument("--cache", type=Path, default=None, help="mgtq cache folder (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (.md beside it)")
    args = parser.parse_args(argv)
    from mgtq.files import atomic_write_text

    if args.sampler is not None:
        from mgtq.sampling import SamplerConfig

        try:
            reuse = SamplerConfig.preset(args.sampler).reuse.enabled
        except ValueError as err:
            parser.error(f"--sampler: {err}")
        if not reuse:
            parser.error(f"--sampler {args.sampler} has no context reuse: leave --sampler out to time the forward")
    if args.tome and args.sampler is not None:
        parser.error("--tome times plain forwards under token merging; leave --sampler out")
    if not 0 <= args.tome < 1:
        parser.error(f"--tome must be a ratio in [0, 1), got {args.tome}")

    report = {"model": args.model, "threads": args.threads, "sampler": args.sampler, "steps": args.steps,
              "tome": args.tome,
              "command": "python " + " ".join(
        ["benchmarks/compile_warm_start.py", *(argv if argv is not None else sys.argv[1:])]),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "formats": {}}
    with tempfile.TemporaryDirectory(prefix="mgtq-compile-cache-") as tmp:
        cache = args.cache or Path(tmp)
        for fmt in (f.strip() for f in args.formats.split(",") if f.strip()):
            report["formats"][fmt] = {start: run_once(args.model, fmt, args.threads, args.repeats, cache, args.sampler,
                                                      args.steps, args.compare_plain and start == "warm", args.tome)
                                      for start in ("cold", "warm")}
            print(fmt, {k: round(v["compile_s"], 1) for k, v in report["formats"][fmt].items()}, flush=True)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    suffix = "" if args.sampler is None else f"_{args.sampler}{args.steps}"
    suffix += f"_tome{args.tome:g}" if args.tome else ""
    out = args.out or Path("benchmarks") / "results" / f"compile_warm_start_{args.model}{suffix}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), to_markdown(report))
    print(to_markdown(report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
