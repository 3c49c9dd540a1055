"""mgtq.bench.lab: the lab in benchmarks/ needs a checkout, and says so."""

from __future__ import annotations

import pytest

from mgtq.bench import BenchConfig


def test_the_lab_outside_a_checkout_is_one_clear_error(monkeypatch, tmp_path):
    from mgtq.bench import lab

    monkeypatch.setattr(lab, "ROOT", tmp_path)  # an installed wheel: no benchmarks/ beside the package
    monkeypatch.delitem(__import__("sys").modules, "mgtq_bench_lab_peers", raising=False)
    with pytest.raises(FileNotFoundError, match="needs a checkout"):
        lab.load_lab("peers")
    with pytest.raises(FileNotFoundError, match="needs a checkout"):
        BenchConfig(peers=("quanto-w4a8",))
    assert BenchConfig(formats=("bf16",)).cases()[0].label == "bf16"  # formats need no lab
