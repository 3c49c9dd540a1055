"""mgtq.finite: the NaN/inf check finds one bad value anywhere, in every float dtype and view."""

import pytest
import torch

from mgtq.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 4097, -1])
def test_all_finite_finds_one_nan_or_infinity_anywhere(dtype, bad, where):
    t = torch.randn(3, 4099, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t) and all_finite(t.t())  # a strided view too
    t.view(-1)[where] = bad
    assert not all_finite(t) and not all_finite(t.t())
    assert not all_finite(t.view(-1)[where:][:1])


def test_all_finite_agrees_with_isfinite_and_takes_empty_and_extreme_tensors():
    big = torch.full((5,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert all_finite(big) and all_finite(-big)  # finite extremes are finite (no sum that could overflow)
    assert all_finite(torch.empty(0, 3))
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        t = torch.randn(64, generator=gen)
        t[torch.rand(64, generator=gen) < 0.05] = float("nan")
        assert all_finite(t) == bool(torch.isfinite(t).all())


def test_all_finite_takes_one_byte_floats():
    t = torch.zeros(8).to(torch.float8_e5m2)
    assert all_finite(t)
    t[3] = float("inf")
    assert not all_finite(t)
