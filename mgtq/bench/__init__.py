"""`mgtq bench`: memory and latency of every format × TomeMGT × CPU offloading (a harness).

    from mgtq.bench import BenchConfig, MeasureSettings, run_bench
    report = run_bench(BenchConfig(model="meissonic-1024", formats=("bf16", "scq"), tome=(0, 0.5),
                                   measure=MeasureSettings(repeats=2, steps=2)))

Modules: formats (the format names), config (what to run), source (which model, its inputs), build
(the transformer in a format, the pipeline), memory / latency (how things are measured), case (one
case, in its own process), result (what one case measured), runner (all cases), report (ratios, JSON,
Markdown). The lab beside it (peers, profiler categories, plots) is in the repository's benchmarks/
(mgtq.bench.lab); the project's goals: benchmarks/bench_goals.py.
"""

from mgtq.bench.config import BenchCase, BenchConfig, MeasureSettings
from mgtq.bench.formats import FORMATS
from mgtq.bench.report import SCHEMA_VERSION, to_markdown, validate_report


def __getattr__(name):
    if name == "run_bench":  # imports torch: only when a run starts, so the CLI's start-up stays light
        from mgtq.bench.runner import run_bench

        return run_bench
    raise AttributeError(f"module 'mgtq.bench' has no attribute {name!r}")


__all__ = ["FORMATS", "BenchCase", "BenchConfig", "MeasureSettings", "SCHEMA_VERSION", "run_bench", "to_markdown",
           "validate_report"]
