"""benchmarks/bench_attention.py on small shapes: SDPA always timed, mgtq's kernel where it is built."""

import json

from mgtq.native import amx


def test_bench_attention_small_shapes(tmp_path, benchmark_script):
    bench = benchmark_script("bench_attention")
    out = tmp_path / "attention"
    shapes = (("small", 1, 2, 20, 40, 64, False), ("small + bias", 1, 2, 20, 40, 64, True))
    text = bench.main(["--rounds", "2", "--warmup", "0", "--out", str(out)], shapes=shapes)
    record = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in record["rows"]] == ["small", "small + bias"]
    expected = ({"torch SDPA"} | ({"mgtq AMX"} if amx.available() else set())
                | ({"mgtq AVX512-BF16"} if amx.avx512_bf16_available() else set()))
    for row in record["rows"]:
        assert set(row["ms"]) == expected and row["ratio"]["torch SDPA"] == 1.0
        assert all(row["ms_min"][k] <= row["ms"][k] <= row["ms_max"][k] for k in row["ms"])
    assert "--rounds 2" in text and out.with_suffix(".md").read_text() == text
