"""benchmarks/bench_reuse.py: the schedule it composes is the sampler's, and a tiny run writes its JSON."""

import json

import pytest
import torch

from mgtq.sampling import SamplerConfig
from mgtq.sampling.maskgit import num_to_mask


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_reuse")


@pytest.mark.parametrize("group", ["confidence", "cells", "masked"])
def test_schedule_plan_computes_what_the_sampler_decodes(bench, group):
    config = SamplerConfig(num_steps=12).replace(reuse=dict(interval=4, group=group, warmup=1))
    plan = bench.schedule_plan(config, (8, 8))
    assert [entry["full"] for entry in plan] == [config.reuse.is_full(i) for i in range(12)]
    masked = [64]
    for step in range(12):
        masked.append(int(num_to_mask(config, step, 64, torch.tensor([masked[-1]]))))
    for full in (i for i, entry in enumerate(plan) if entry["full"] and i + 1 < 12 and not plan[i + 1]["full"]):
        active = plan[full + 1]["active"]
        until = next((i for i in range(full + 1, 12) if plan[i]["full"]), 12)
        expected = masked[full] - (0 if group == "masked" else masked[until])
        assert int(active.sum()) == expected
        assert all(plan[i]["active"] is active for i in range(full + 1, until))


def test_tiny_run_writes_the_composed_speedup(bench, tmp_path):
    out = tmp_path / "reuse.json"
    assert bench.main(["--model", "test-micro", "--grid", "8", "--steps", "6", "--reuse-interval", "3",
                       "--formats", "bf16,w4a16", "--rounds", "1", "--check", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sampler"]["reuse"]["interval"] == 3 and set(result["formats"]) == {"bf16", "w4a16"}
    for row in result["formats"].values():
        assert row["full_steps"] + sum(item["steps"] for item in row["local_steps"]) == 6
        assert row["speedup"] == pytest.approx(row["baseline_s"] / row["reuse_s"])
        assert row["check"]["reuse_s"] > 0


@pytest.mark.parametrize("threads, flags, timing", [
    (1, [], "process CPU time"), (2, [], "wall-clock time"), (2, ["--clock", "cpu"], "process CPU time")])
def test_more_threads_are_timed_on_the_wall_clock(bench, tmp_path, monkeypatch, threads, flags, timing):
    # CPU time adds the threads up: a step that leaves one idle would read cheaper than it runs.
    read = {"cpu": [], "wall": []}
    for clock, (name, fn) in list(bench.CLOCKS.items()):
        monkeypatch.setitem(bench.CLOCKS, clock, (name, lambda c=clock, f=fn: read[c].append(1) or f()))
    out = tmp_path / "reuse.json"
    assert bench.main(["--model", "test-micro", "--grid", "8", "--steps", "4", "--reuse-interval", "2", "--formats",
                       "bf16", "--rounds", "1", "--threads", str(threads), *flags, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["timing"] == f"{timing}, median of rounds"
    used = "cpu" if timing.startswith("process") else "wall"
    assert read[used] and not read["wall" if used == "cpu" else "cpu"]


def test_no_reuse_is_an_error(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--model", "test-micro", "--grid", "8", "--steps", "4", "--json", str(tmp_path / "x.json")])


def test_refresh_is_refused_with_what_to_run_instead(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "test-micro", "--grid", "8", "--steps", "4", "--reuse-interval", "3",
                    "--reuse-refresh", "0.1", "--json", str(tmp_path / "x.json")])
    assert "do not model K/V refresh" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_cached_formats_carry_the_w4a8_weight_cache(bench):
    from mgtq.quantization import W4A8Linear

    layers = [m for m in bench.build("test-micro", "scq-cached").modules() if isinstance(m, W4A8Linear)]
    assert layers and all(layer.weight_cache is not None for layer in layers)
    assert all(m.weight_cache is None for m in bench.build("test-micro", "scq").modules() if isinstance(m, W4A8Linear))
