"""benchmarks/bench_float_linear.py on few rows: every variant timed each round, both dtypes, every shape."""

import json

import pytest
import torch


@pytest.mark.skipif(not torch._C._has_mkldnn, reason="times oneDNN's linear")
def test_bench_float_linear_few_rows(tmp_path, benchmark_script):
    bench = benchmark_script("bench_float_linear")
    out = tmp_path / "float_linear"
    text = bench.main(["--rows", "8", "--rounds", "2", "--warmup", "0", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert [(r["dtype"], r["k"], r["n"]) for r in record["rows"]] == [
        (d, k, n) for d in ("bfloat16", "float32") for k, n in bench.SHAPES]
    for row in record["rows"]:
        assert set(row["ms"]) == {"F.linear", "oneDNN linear", "F.linear + GELU", "oneDNN linear+GELU"}
        assert all(row["ms_min"][k] <= row["ms"][k] <= row["ms_max"][k] for k in row["ms"])
    assert "--rows 8" in text and out.with_suffix(".md").read_text() == text
