"""mgtq.sampling.tricks.differential: which tokens differential sampling resamples, and from what."""

import pytest
import torch

from mgtq.sampling.tricks.differential import CLIP_FLOOR, differential_probs, num_resampled, token_kl


def test_differential_resamples_exactly_the_lowest_kl_tokens():
    gen = torch.Generator().manual_seed(0)
    prev = torch.rand(2, 20, 5, generator=gen).softmax(-1)
    probs = (torch.rand(2, 20, 5, generator=gen) * 3).softmax(-1)
    probs[1, 4] = prev[1, 4]  # KL 0 → among the lowest; |Δ| is zero → that row must keep p_i
    out = differential_probs(probs, prev, percent=75)
    k = num_resampled(75, 20)
    assert k == 15
    kl = token_kl(probs, prev)
    for b in range(2):
        lowest = set(kl[b].argsort(stable=True)[:k].tolist())
        changed = {j for j in range(20) if not torch.equal(out[b, j], probs[b, j])}
        expected = lowest - ({4} if b == 1 else set())
        assert changed == expected
        for j in expected:
            residual = (probs[b, j] - prev[b, j]).abs()
            assert torch.allclose(out[b, j], residual / residual.sum())
    assert torch.allclose(out.sum(-1), torch.ones(2, 20))
    assert torch.equal(differential_probs(probs, prev, percent=0), probs)


def test_differential_clipped_resamples_from_the_official_signed_difference():
    gen = torch.Generator().manual_seed(1)
    prev = torch.rand(1, 12, 6, generator=gen).softmax(-1)
    probs = (torch.rand(1, 12, 6, generator=gen) * 3).softmax(-1)
    probs[0, 2] = prev[0, 2]  # identical row: the clipped rule makes it uniform (the abs rule keeps p_i)
    clipped = differential_probs(probs, prev, percent=100, rule="clipped")
    weights = (probs - prev).clamp_min(CLIP_FLOOR)
    assert torch.allclose(clipped[0], weights[0] / weights[0].sum(-1, keepdim=True))
    assert torch.allclose(clipped[0, 2], torch.full((6,), 1 / 6))
    fell = (probs - prev) < 0  # tokens whose probability fell are (almost) never drawn
    assert (clipped[fell] < 1e-4).all()
    assert not torch.allclose(clipped, differential_probs(probs, prev, percent=100, rule="abs"))
    with pytest.raises(ValueError, match="resample"):
        differential_probs(probs, prev, percent=50, rule="signed")


def test_differential_counts():
    assert num_resampled(75, 16) == 12 and num_resampled(75, 4096) == 3072
    assert num_resampled(100, 7) == 7 and num_resampled(0, 7) == 0 and num_resampled(10, 7) == 0
