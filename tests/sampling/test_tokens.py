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


def test_sample_tokens_on_chosen_rows_draws_them_alone_from_each_samples_stream():
    from mgtq.sampling.tokens import sample_tokens

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 12, 7, generator=g).softmax(-1)
    rows = torch.rand(2, 12, generator=g) < 0.4
    rows[1] = False  # a sample with nothing to draw
    drawn = sample_tokens(probs, [torch.Generator().manual_seed(s) for s in (1, 2)], rows)
    alone = torch.multinomial(probs[0][rows[0]], 1, generator=torch.Generator().manual_seed(1))[:, 0]
    assert torch.equal(drawn[0][rows[0]], alone) and (drawn[0][~rows[0]] == 0).all() and (drawn[1] == 0).all()
    everything = sample_tokens(probs, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(everything[1], torch.multinomial(probs[1], 1, generator=torch.Generator().manual_seed(2))[:, 0])
