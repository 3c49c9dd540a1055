"""mgtq.sampling.tokens: Gumbel noise and re-masking of the lowest-confidence tokens."""

import torch

from mgtq.sampling.maskgit import remask_lowest


def test_gumbel_noise_is_finite():
    from mgtq.sampling.maskgit import gumbel_noise

    noise = gumbel_noise((10000,), torch.Generator().manual_seed(0), "cpu")
    assert torch.isfinite(noise).all() and abs(noise.mean().item() - 0.5772) < 0.05  # Euler–Mascheroni


def test_remask_lowest_picks_exactly_n():
    conf = torch.tensor([[0.5, 0.1, 0.9, 0.3], [1.0, 2.0, 3.0, 4.0]])
    mask = remask_lowest(conf, torch.tensor([2, 1]))
    assert mask.tolist() == [[False, True, False, True], [True, False, False, False]]
