"""benchmarks/bench_blocks.py on tiny shapes: every variant is timed in each round, bytes count the caches."""

import json

import torch


def test_bench_blocks_tiny(tmp_path, benchmark_script):
    bench = benchmark_script("bench_blocks")
    out = tmp_path / "blocks"
    bench.main(["--tiny", "--rounds", "2", "--warmup", "1", "--formats", "bf16,w4a8,w4a8-cached", "--profile",
                "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    by_name = {v["name"]: v for v in record["variants"]}
    assert list(by_name) == ["bf16", "w4a8", "w4a8-cached"]
    assert all(len(v["seconds"]) == 2 and min(v["seconds"]) > 0 for v in by_name.values())
    assert by_name["bf16"]["ratio_to_bf16"] == 1.0
    # Linear weights: bf16 2 bytes each; int4 half a byte + fp32 scales; the int8 cache one more byte each.
    blocks = bench.build_blocks(bench.Shape(dim=64, heads=2, head_dim=32, image_tokens=16, text_tokens=5,
                                            axes_dims_rope=(8, 12, 12)), "bf16", 0)
    n_weights = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    assert by_name["bf16"]["weight_bytes"] == 2 * n_weights
    assert by_name["w4a8-cached"]["weight_bytes"] - by_name["w4a8"]["weight_bytes"] == n_weights
    assert set(record["profile"]) == set(by_name)
    assert "× bf16" in out.with_suffix(".md").read_text()
