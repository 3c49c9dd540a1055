"""mgtq.sampling.schedules: the mask-ratio schedules are monotone with exact endpoints."""

import math

import pytest
import torch

from mgtq.sampling import mask_ratio


@pytest.mark.parametrize("schedule", ["cosine", "linear", "pow", "root"])
@pytest.mark.parametrize("rho", [0.3, 0.6, 1.0, 2.5])
def test_schedules_monotone_with_right_endpoints(schedule, rho):
    values = mask_ratio(schedule, torch.linspace(0, 1, 201), rho=rho)
    assert math.isclose(float(values[0]), 1.0, abs_tol=1e-12) and math.isclose(float(values[-1]), 0.0, abs_tol=1e-12)
    assert (values[1:] <= values[:-1] + 1e-12).all()
    if schedule == "root":
        assert math.isclose(mask_ratio("root", 0.5, rho), 1 - 0.5 ** rho)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "pow", "root"])
def test_schedules_monotone_with_endpoints(schedule):
    ts = torch.linspace(0, 1, 101)
    values = mask_ratio(schedule, ts, rho=0.6)
    assert math.isclose(float(values[0]), 1.0, abs_tol=1e-9) and math.isclose(float(values[-1]), 0.0, abs_tol=1e-9)
    assert (values[1:] <= values[:-1] + 1e-12).all()
