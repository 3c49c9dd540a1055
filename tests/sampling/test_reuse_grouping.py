"""Grouped decoding: the group's size is the schedule's count, its members the most confident."""

import pytest
import torch

from mgtq.sampling.tricks.reuse import decoded_until, most_confident
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


def test_most_confident_cells_takes_whole_cells_best_first():
    from mgtq.sampling.tricks.reuse import most_confident_cells

    confidence = torch.tensor([[1., 9, 2, 3, 4, 5, 6, 0, 7, 8, 1, 1, 2, 2, 3, 3]])  # 4×4 grid, four 2×2 cells
    candidates = torch.ones(1, 16, dtype=torch.bool)
    candidates[0, 1] = False  # decoded: its 9 does not count
    group = most_confident_cells(confidence, candidates, torch.tensor([5]), (4, 4)).view(4, 4)
    # best cell: rows 2-3, cols 0-1 (max 8), all four; then the cell of max 6 gives its best token (6)
    assert group.nonzero().tolist() == [[1, 2], [2, 0], [2, 1], [3, 0], [3, 1]]
    with pytest.raises(ValueError, match="divisible by 2"):
        most_confident_cells(confidence[:, :15], candidates[:, :15], torch.tensor([1]), (3, 5))


def test_most_confident_cells_fills_the_count_from_candidates_only():
    from mgtq.sampling.tricks.reuse import most_confident_cells

    generator = torch.Generator().manual_seed(0)
    confidence = torch.randn(3, 64, generator=generator)
    candidates = torch.rand(3, 64, generator=generator) < 0.4
    size = torch.minimum(candidates.sum(1), torch.tensor([5, 9, 13]))
    group = most_confident_cells(confidence, candidates, size, (8, 8))
    assert torch.equal(group.sum(1), size) and not (group & ~candidates).any()
