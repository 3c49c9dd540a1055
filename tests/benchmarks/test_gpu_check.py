"""benchmarks/gpu_check.py --smoke: every step of the GPU check runs on CPU and writes its files."""

import json


def test_gpu_check_smoke(tmp_path, random_pipeline_dir, benchmark_script):
    gpu_check = benchmark_script("gpu_check")
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--model", str(random_pipeline_dir)]) == 0
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert [row["label"] for row in result["bench"]] == ["bf16", "w4a16"]
    assert all(row["status"] == "ok" and row["forward_s"] > 0 for row in result["bench"])
    assert (tmp_path / "gpu_smoke.md").read_text().startswith("# GPU check")
    from dataclasses import replace

    import torch

    from mgtq.quantization import kernels

    # each row is what a real call of M bf16 rows is given on this machine (mgtq's own CPU kernels included)
    assert {(row["rows"], row["compiled"]) for row in result["kernels"]} == {
        (rows, compiled) for rows in ("tokens", "adaLN") for compiled in (False, True)}
    for row in result["kernels"]:
        x = torch.empty(row["m"], 1024, dtype=torch.bfloat16)
        ctx = replace(kernels.context_for(x, k=1024, n=1024, group_size=1024), compiling=row["compiled"])
        assert row["cpu_class"] == kernels.cpu_class()
        assert (row["w4a16"], row["w4a8"]) == (kernels.choose_kernel("w4a16", ctx), kernels.choose_kernel("w4a8", ctx))
        onednn = kernels.weight_cache_backend(row["cpu_class"]) == "onednn"
        assert row["w4a8_cached"] == kernels.choose_kernel("w4a8", replace(ctx, cache=onednn))
    assert "W4A8 + weight cache" in (tmp_path / "gpu_smoke.md").read_text()


def test_a_cuda_test_run_past_its_time_says_so_with_what_it_printed(monkeypatch, benchmark_script):
    import subprocess

    gpu_check = benchmark_script("gpu_check")

    def too_slow(cmd, **kwargs):
        assert cmd[-3:] == ["-m", "cuda and not slow", "tests"]
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=b"tests/a.py ..\ntests/b.py .F")

    monkeypatch.setattr(gpu_check.subprocess, "run", too_slow)
    result = gpu_check.run_cuda_tests(timeout_s=3)
    assert result["status"] == "timeout" and result["output_tail"] == ["tests/a.py ..", "tests/b.py .F"]
    assert "timed out after 3 s" in result["summary"]
