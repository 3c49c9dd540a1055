"""benchmarks/gpu_check.py --smoke: every step of the GPU check runs on CPU and writes its files."""

import json


def test_gpu_check_smoke(tmp_path, random_pipeline_dir, benchmark_script):
    gpu_check = benchmark_script("gpu_check")
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--model", str(random_pipeline_dir)]) == 0
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert [row["label"] for row in result["bench"]] == ["bf16", "w4a16"]
    assert all(row["status"] == "ok" and row["forward_s"] > 0 for row in result["bench"])
    assert (tmp_path / "gpu_smoke.md").read_text().startswith("# GPU check")
    compiled = [row for row in result["kernels"] if row["compiled"] and row["rows"] == "tokens"]
    assert compiled and compiled[0]["w4a8"] == "int_mm_chunked_inline" and compiled[0]["cpu_class"]
    from mgtq.quantization import kernels

    onednn = kernels.weight_cache_backend(compiled[0]["cpu_class"]) == "onednn"
    assert compiled[0]["w4a8_cached"] == ("onednn_inline" if onednn else "int_mm_chunked_inline")
    assert "W4A8 + weight cache" in (tmp_path / "gpu_smoke.md").read_text()
