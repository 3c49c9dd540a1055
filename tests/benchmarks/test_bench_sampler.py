"""benchmarks/bench_sampler.py: the sampler's own cost per step over a stub model."""

import json


def test_bench_sampler_writes_per_step_cost_and_profile_shares(benchmark_script, tmp_path):
    bench = benchmark_script("bench_sampler")
    out = tmp_path / "sampler.json"
    assert bench.main(["--grid", "4", "--codebook", "16", "--steps", "3", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["grid"] == 4 and result["steps"] == 3
    low, high = result["per_step_range_s"]
    assert 0 < low <= result["per_step_s"] <= high
    shares = result["profile_self_fraction"]
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert any("multinomial" in name or "exponential" in name for name in shares)  # the token draw is timed


def test_stub_model_returns_the_same_guided_logits_every_call(benchmark_script):
    import torch

    model_fn = benchmark_script("bench_sampler").stub_model(4, 16, 9.0, 0)
    tokens = torch.zeros(1, 4, 4, dtype=torch.long)
    first, second = model_fn(tokens, torch.ones(1)), model_fn(tokens, torch.zeros(1))
    assert first.shape == (1, 16, 4, 4) and first.dtype == torch.float32
    assert torch.equal(first, second)
