"""mgtq.sampling.tricks.noise: the noise-regularization intensity curves (Fig. 8)."""

import math

import pytest

from mgtq.sampling.tricks.noise import noise_intensity


def test_noise_curves():
    assert noise_intensity("abs_cos", 0.0, 2.0) == pytest.approx(2.0)
    assert noise_intensity("abs_cos", 0.5, 2.0) == pytest.approx(0.0, abs=1e-12)
    assert noise_intensity("abs_cos", 1.0, 2.0) == pytest.approx(2.0)
    assert noise_intensity("half_abs_cos", 0.0, 2.0) == pytest.approx(1.0)
    assert noise_intensity("constant", 0.3, 0.7) == pytest.approx(0.7)
    # Fig. 8: |cos πt| halved before t = ½ ("early") or from t = ½ on ("late")
    for t in (0.0, 0.2, 0.49, 0.5, 0.8, 1.0):
        full = 2.0 * abs(math.cos(math.pi * t))
        assert noise_intensity("abs_cos_half_early", t, 2.0) == pytest.approx(full / 2 if t < 0.5 else full)
        assert noise_intensity("abs_cos_half_late", t, 2.0) == pytest.approx(full if t < 0.5 else full / 2)
    knots = ((0.0, 0.0), (0.5, 1.0), (0.5, 3.0), (1.0, 3.0))
    assert noise_intensity("piecewise", 0.25, 2.0, knots) == pytest.approx(1.0)
    assert noise_intensity("piecewise", 0.5, 2.0, knots) == pytest.approx(6.0)  # at a jump, the later knot wins
    assert noise_intensity("off", 0.0, 2.0) == 0.0
