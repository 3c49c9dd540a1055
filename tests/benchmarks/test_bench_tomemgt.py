"""benchmarks/bench_tomemgt.py: a tiny run composes each setting's speed-up against no merging in the same run."""

import json

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_tomemgt")


def test_tiny_run_writes_composed_and_whole_forward_speedups(bench, tmp_path):
    out = tmp_path / "tome"
    bench.main(["--preset", "test-micro", "--token-grid", "16", "--text-tokens", "8", "--block-repeats", "1",
                "--rounds", "1", "--settings", "all:0.5:cell", "--forward-settings", "all:0.5:cell", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    none, merged = result["rows"]
    assert (none["key"], none["speedup"], none["forward_speedup"]) == ("none", 1.0, 1.0)
    assert merged["key"] == "all:0.5:cell" and merged["speedup"] > 0 and merged["forward_speedup"] > 0
    assert 0 < merged["merged_fraction"] <= 0.5
    assert result["setup"]["model"] == "test-micro (random weights)"
    assert "| all | 0.5 |" in out.with_suffix(".md").read_text()
