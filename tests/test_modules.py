"""mgtq.modules: helpers on torch modules."""

import torch

from mgtq.modules import set_submodule


def test_set_submodule():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    set_submodule(model, "1.0", torch.nn.Identity())
    assert isinstance(model[1][0], torch.nn.Identity)
