"""benchmarks/bench_profile.py: the profiler's operator categories."""

from __future__ import annotations

from mgtq.bench.lab import load_lab


def test_profile_categories():
    categorize = load_lab("profile").categorize
    assert categorize("aten::_int_mm") == "int8 GEMM"
    assert categorize("aten::mm") == "float GEMM"
    assert categorize("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert categorize("aten::bitwise_left_shift") == "int4 unpack"
    assert categorize("mgtq::w4a8_cpu") == "int8 GEMM"
    assert categorize("mgtq::w4a16_cpu") == "int8-weight GEMM"
    assert categorize("mgtq::quantize_int8_rows") == "int8 quantize"
    assert categorize("mgtq::attention_cpu") == "attention"
    assert categorize("mgtq::qknorm_rope_cpu") == "other"
    assert categorize("aten::layer_norm") == "other"


def test_profile_call_splits_a_cpu_call_by_category():
    import torch

    a = torch.randn(256, 256)
    profile = load_lab("profile").profile_call(lambda: torch.relu(a @ a), device="cpu")
    assert profile["clock"] == "cpu" and profile["split_s"]["float GEMM"] > 0
    assert abs(sum(profile["split_fraction"].values()) - 1) < 1e-9
    assert profile["top_ops"][0]["self_s"] >= profile["top_ops"][-1]["self_s"]
