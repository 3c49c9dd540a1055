"""benchmarks/plot_reuse.py: speed-ups joined by reuse section, the fewer-steps baseline, the Pareto front."""

import json

import pytest

from mgtq.sampling import SamplerConfig


@pytest.fixture(scope="module")
def plot_reuse(benchmark_script):
    return benchmark_script("plot_reuse")


def _quality():
    base = SamplerConfig(num_steps=16)
    rows = {"none": (base, 0.80), "steps-8": (base.replace(num_steps=8), 0.66),
            "reuse-3-cells-w2": (base.replace(reuse=dict(interval=3, group="cells", warmup=2)), 0.79),
            "reuse-4-cells": (base.replace(reuse=dict(interval=4, group="cells")), 0.60),
            "reuse-2": (base.replace(reuse=dict(interval=2)), 0.70)}
    return {"split": "test", "n": 4, "base_sampler": base.to_dict(),
            "settings": {name: {"overall": acc, "token_agreement": 0.5, "sampler": config.to_dict()}
                         for name, (config, acc) in rows.items()}}


def _speed(reuse, speedup):
    return {"sampler": SamplerConfig(num_steps=48).replace(reuse=reuse).to_dict(),
            "formats": {"bf16": {"speedup": speedup}}}


def test_speedups_and_front(plot_reuse):
    speeds = [_speed(dict(interval=3, group="cells", warmup=2), 2.1), _speed(dict(interval=4, group="cells"), 2.5)]
    speed = plot_reuse.speedups(_quality(), speeds, "bf16")
    assert speed == {"none": 1.0, "steps-8": 2.0, "reuse-3-cells-w2": 2.1, "reuse-4-cells": 2.5, "reuse-2": None}
    # a K/V refresh setting does not take the speed of the same reuse without refresh; old speed runs lack the key
    quality = _quality()
    refresh = SamplerConfig(num_steps=16).replace(reuse=dict(interval=3, group="cells", warmup=2, refresh=0.1))
    quality["settings"]["reuse-3-cells-w2-r0.1"] = {**quality["settings"]["reuse-3-cells-w2"],
                                                    "sampler": refresh.to_dict()}
    old = _speed(dict(interval=3, group="cells", warmup=2), 2.1)
    del old["sampler"]["reuse"]["refresh"]
    speed = plot_reuse.speedups(quality, [old], "bf16")
    assert speed["reuse-3-cells-w2"] == 2.1 and speed["reuse-3-cells-w2-r0.1"] is None
    front = plot_reuse.pareto({"none": (1.0, 0.8), "steps-8": (2.0, 0.66), "a": (2.1, 0.79), "b": (2.5, 0.6)})
    assert front == {"none", "a", "b"}  # steps-8 is beaten by a in both


def test_main_writes_the_png_and_table(plot_reuse, tmp_path):
    (tmp_path / "q.json").write_text(json.dumps(_quality()))
    (tmp_path / "s.json").write_text(json.dumps(_speed(dict(interval=3, group="cells", warmup=2), 2.1)))
    out = tmp_path / "pareto.png"
    assert plot_reuse.main(["--quality", str(tmp_path / "q.json"), "--speed", str(tmp_path / "s.json"),
                            "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    table = out.with_suffix(".md").read_text()
    assert "| reuse-3-cells-w2 | 0.790 | 0.500 | 2.10× | ● |" in table and "| reuse-2 | 0.700 | 0.500 | — |  |" in table
