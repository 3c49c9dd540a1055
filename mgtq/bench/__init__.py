"""`mgtq bench`: memory and latency of every format × TomeMGT × CPU offloading, beside peers.

    from mgtq.bench import BenchConfig, MeasureSettings, run_bench
    report = run_bench(BenchConfig(model="meissonic-1024", formats=("bf16", "scq"), tome=(0, 0.5),
                                   measure=MeasureSettings(repeats=2, steps=2)))

Modules: config (what to run), source (which model, its inputs), formats (the transformer in each
format: folders through mgtq.pipeline / mgtq.quantization.checkpoint, presets through mgtq.testing),
peers (optimum-quanto, torchao), memory / latency / profile (how things are measured), child (one
case in its own process), result (CaseResult: what one case measured), runner (all cases, in
order), report (ratios, Markdown, PNG). The project's goals: benchmarks/bench_goals.py.
"""

from mgtq.bench.config import FORMATS, BenchCase, BenchConfig, MeasureSettings
from mgtq.bench.report import SCHEMA_VERSION, to_markdown, validate_report
from mgtq.bench.runner import run_bench

__all__ = ["FORMATS", "BenchCase", "BenchConfig", "MeasureSettings", "SCHEMA_VERSION", "run_bench", "to_markdown",
           "validate_report"]
