import pytest
import torch


@pytest.fixture
def slots_of():
    """slots_of(unmerge, batch, n_merged) -> (B, N) index of the merged token each original token went to, read back
    through unmerge; shared by the matching tests and the RoPE merge test."""

    def read(unmerge, batch, n_merged):
        ids = torch.arange(n_merged, dtype=torch.float64).expand(batch, -1)[..., None]
        return unmerge(ids)[..., 0].long()

    return read
