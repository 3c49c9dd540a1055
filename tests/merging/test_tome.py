"""mgtq.merging.tome: the 2x2 bipartite matching (counts, destinations, identity, means, similarity, per sample)."""

import pytest
import torch

from mgtq.merging import bipartite_soft_matching_2x2, cell_destinations


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (6, 4)])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.95])
def test_merged_count_is_exactly_r_capped_at_sources(grid, ratio, slots_of):
    n = grid[0] * grid[1]
    metric = torch.randn(3, n, 8, generator=torch.Generator().manual_seed(1))
    n_src = n - (grid[0] // 2) * (grid[1] // 2)
    r = int(ratio * n)
    dst = cell_destinations(grid, torch.Generator().manual_seed(2))
    merge, unmerge = bipartite_soft_matching_2x2(metric, grid, r, dst)
    expected = n - min(r, n_src)
    assert merge(metric).shape == (3, expected, 8)
    assert unmerge(merge(metric)).shape == (3, n, 8)
    assert (torch.bincount(slots_of(unmerge, 3, expected)[0], minlength=expected) >= 1).all()  # every slot used


def test_destinations_one_per_2x2_cell():
    grid = (6, 8)
    for generator in (None, torch.Generator().manual_seed(0)):
        dst = cell_destinations(grid, generator)
        rows, cols = dst // grid[1], dst % grid[1]
        cells = (rows // 2) * (grid[1] // 2) + cols // 2
        assert sorted(cells.tolist()) == list(range(12))
        assert (dst.diff() > 0).all()
    top_left = cell_destinations(grid)
    assert ((top_left // grid[1]) % 2 == 0).all() and ((top_left % grid[1]) % 2 == 0).all()
    a = cell_destinations(grid, torch.Generator().manual_seed(3))
    assert torch.equal(a, cell_destinations(grid, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, cell_destinations(grid, torch.Generator().manual_seed(4)))


def test_unmerge_of_merge_is_identity_on_untouched_tokens(slots_of):
    grid, batch = (8, 8), 2
    x = torch.randn(batch, 64, 16, generator=torch.Generator().manual_seed(0))
    merge, unmerge = bipartite_soft_matching_2x2(x, grid, 20)
    slots = slots_of(unmerge, batch, 44)
    group_size = torch.stack([torch.bincount(s, minlength=44) for s in slots]).gather(1, slots)  # (B, N)
    untouched = group_size == 1
    assert untouched.any() and not untouched.all()
    restored = unmerge(merge(x))
    assert torch.equal(restored[untouched], x[untouched])
    assert not torch.equal(restored[~untouched], x[~untouched])


def test_merged_tokens_are_the_mean_of_their_members_and_copied_back(slots_of):
    grid, batch = (8, 8), 3
    x = torch.randn(batch, 64, 16, generator=torch.Generator().manual_seed(0))
    merge, unmerge = bipartite_soft_matching_2x2(x, grid, 32, cell_destinations(grid, torch.Generator().manual_seed(1)))
    merged, slots = merge(x), slots_of(unmerge, batch, 32)
    for b in range(batch):
        for k in range(32):
            members = (slots[b] == k).nonzero().squeeze(1)
            assert len(members) >= 1  # a destination plus any sources (from any cell) that chose it
            torch.testing.assert_close(merged[b, k], x[b, members].mean(0), rtol=1e-6, atol=1e-6)
            assert torch.equal(unmerge(merged)[b, members], merged[b, k].expand(len(members), -1))


def test_merges_the_most_similar_sources(slots_of):
    # Sources that duplicate a destination (cosine 1) must be the ones merged.
    grid = (4, 4)
    x = torch.nn.functional.one_hot(torch.arange(16), 16).float()[None]  # all orthogonal
    dst = cell_destinations(grid)  # top-left of each cell: tokens 0, 2, 8, 10
    x[0, 5] = x[0, 0]
    x[0, 15] = 3 * x[0, 10]  # cosine ignores scale
    merge, unmerge = bipartite_soft_matching_2x2(x, grid, 2, dst)
    slots = slots_of(unmerge, 1, 14)[0]
    assert slots[5] == slots[0] and slots[15] == slots[10]
    assert len(set(slots.tolist())) == 14


def test_matching_is_per_sample():
    grid = (8, 8)
    x = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(0))
    dst = cell_destinations(grid, torch.Generator().manual_seed(1))
    merge, _ = bipartite_soft_matching_2x2(x, grid, 30, dst)
    for b in range(3):
        alone, _ = bipartite_soft_matching_2x2(x[b:b + 1], grid, 30, dst)
        assert torch.equal(merge(x)[b], alone(x[b:b + 1])[0])
