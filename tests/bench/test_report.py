from __future__ import annotations

import pytest

from mgtq.bench import BenchConfig
from mgtq.bench.report import compute_ratios
from mgtq.bench.result import CaseResult


"""mgtq.bench.report: ratios between cases of one bench run."""


def test_bench_compile_cases_compare_with_compiled_bf16():
    from mgtq.bench.config import BenchConfig
    from mgtq.bench.report import compute_ratios
    from mgtq.bench.result import CaseResult

    labels = [c.label for c in BenchConfig(formats=("bf16", "scq"), compile=True).cases()]
    assert labels == ["bf16", "scq", "bf16+compile", "scq+compile"]
    # peers are compiled too (torchao's CPU int8 path is written for Inductor), and compared with compiled bf16
    labels = [c.label for c in BenchConfig(formats=("bf16",), compile=True, peers=("torchao-w8a8",)).cases()]
    assert labels == ["bf16", "bf16+compile", "torchao-w8a8", "torchao-w8a8+compile"]

    def result(label, forward):
        target = label.split("+")[0]
        return CaseResult(label=label, target=target, kind="mgtq", compile=label.endswith("+compile"),
                          latency={"forward": {"median": forward}, "image": None})

    peer = CaseResult(label="torchao-w8a8+compile", target="torchao-w8a8", kind="peer", compile=True,
                      latency={"forward": {"median": 6.0}, "image": None})
    ratios = compute_ratios([result("bf16", 10.0), result("scq", 12.0), result("bf16+compile", 5.0),
                             result("scq+compile", 4.0), peer])
    assert ratios["scq+compile"]["forward_vs_bf16"] == 0.8  # against compiled bf16, not eager
    assert ratios["torchao-w8a8+compile"]["forward_vs_bf16"] == 1.2
    assert ratios["bf16+compile"]["forward_speedup_vs_eager"] == 2.0


def test_ratios_from_typed_results():
    def res(label, target, nbytes, fwd, tome=0.0):
        return CaseResult(label=label, target=target, kind="mgtq", tome=tome, weights={"transformer_bytes": nbytes},
                          memory={"peak_rss_process": 10}, latency={"forward": {"median": fwd}, "image": None})

    results = [res("bf16", "bf16", 100, 1.0), res("scq", "scq", 27, 0.9), res("bf16+tome0.5", "bf16", 100, 0.5, 0.5),
               CaseResult(label="quanto-w4a8", target="quanto-w4a8", kind="peer", status="skipped", message="absent")]
    ratios = compute_ratios(results)
    assert ratios["scq"]["weights_vs_bf16"] == pytest.approx(0.27) and ratios["scq"]["forward_vs_bf16"] == 0.9
    assert ratios["bf16+tome0.5"]["forward_speedup_vs_no_tome"] == pytest.approx(2.0)
    assert "quanto-w4a8" not in ratios


def _timed(label, target, samples, compile=False):
    forward = {"median": sorted(samples)[len(samples) // 2], "samples": samples, "cpu_samples": samples,
               "cpu_median": sorted(samples)[len(samples) // 2], "rounds": list(range(len(samples)))}
    return CaseResult(label=label, target=target, kind="mgtq", compile=compile, weights={"transformer_bytes": 1},
                      memory={"peak_rss_process": 1}, latency={"forward": forward, "image": None})


def test_interleaved_ratio_is_the_median_of_per_round_ratios_not_of_medians():
    # Round 2 is slow for both (machine drift): per-round ratios cancel it, a ratio of medians does not.
    results = [_timed("bf16", "bf16", [1.0, 1.0, 3.0]), _timed("scq", "scq", [0.8, 0.9, 2.4]),
               _timed("bf16+compile", "bf16", [0.5, 0.5, 1.5], compile=True)]
    ratios = compute_ratios(results)
    assert ratios["scq"]["forward_vs_bf16"] == pytest.approx(0.8)  # per round 0.8, 0.9, 0.8
    assert ratios["scq"]["forward_vs_bf16_spread"] == pytest.approx({"min": 0.8, "max": 0.9, "rounds": 3})
    assert ratios["bf16+compile"]["forward_speedup_vs_eager"] == pytest.approx(2.0)
    sequential = [_timed("bf16", "bf16", [1.0, 1.0, 3.0]), _timed("scq", "scq", [0.8, 0.9, 2.4])]
    for r in sequential:
        r.latency["forward"]["rounds"] = None
    assert compute_ratios(sequential)["scq"]["forward_vs_bf16"] == pytest.approx(0.9)  # medians 0.9 / 1.0
    assert "forward_vs_bf16_spread" not in compute_ratios(sequential)["scq"]


def test_a_memory_only_report_says_nothing_was_timed_and_the_cached_formats_name_both_caches():
    import copy
    import json
    from pathlib import Path

    from mgtq.bench.formats import Format
    from mgtq.bench.report import to_markdown

    report = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" /
                         "bench_tiny-shapes.json").read_text())
    assert "timed forwards per config" in to_markdown(report)
    memory_only = copy.deepcopy(report)
    memory_only["settings"]["measure"]["latency"] = False
    text = to_markdown(memory_only)
    assert "Timing: none (a memory-only run)." in text and "timed forwards per config" not in text
    scheme = Format.parse("w4a8-cached").scheme  # the cache is oneDNN's only on amx-int8 CPUs
    assert "oneDNN's prepacked layout on amx-int8 CPUs" in scheme and "the plain int8 weight elsewhere" in scheme
