"""Grouped decoding: the group's size is the schedule's count, its members the most confident."""

import torch

from mgtq.reuse.grouping import decoded_until, most_confident
from mgtq.sampling import SamplerConfig
from mgtq.sampling.maskgit import num_to_mask


def test_decoded_until_sums_the_schedules_counts():
    config = SamplerConfig(num_steps=8)
    count = lambda step, n, m: num_to_mask(config, step, n, m)  # noqa: E731
    masked = torch.tensor([200, 200])
    left = masked
    for step in (3, 4):
        left = count(step, 256, left)
    assert torch.equal(decoded_until(count, 2, 5, 256, masked), masked - left)
    assert torch.equal(decoded_until(count, 6, 8, 256, torch.tensor([9])), torch.tensor([9]))  # the last step: all
    assert torch.equal(decoded_until(count, 2, 3, 256, masked), torch.zeros(2, dtype=torch.long))


def test_most_confident_picks_among_candidates_only():
    confidence = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0]])
    candidates = torch.tensor([[False, True, True, True, True]])
    assert most_confident(confidence, candidates, torch.tensor([2])).tolist() == [[False, False, True, True, False]]
    assert most_confident(confidence, candidates, torch.tensor([9])).tolist() == candidates.tolist()
