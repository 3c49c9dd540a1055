"""mgtq.merging.token_merge: the RoPE tables of merged tokens, and proportional attention: with log(size)
on the keys, a token that stands for s identical tokens weighs exactly what those s tokens weighed;
without it, merging changes attention."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgtq.merging import (
    TomeConfig,
    apply_tomemgt,
    cell_destinations,
    match_2x2,
    merge_rope,
    remove_tomemgt,
)
from mgtq.models import build_transformer
from mgtq.models.transformer import Attention, rope_tables
from testkit import micro_forward_inputs


def _cell_duplicated(batch: int, grid: tuple[int, int], dim: int, generator: torch.Generator) -> torch.Tensor:
    """(B, h·w, dim) image tokens where every 2×2 cell holds four copies of one random row."""
    h, w = grid
    cells = torch.randn(batch, h // 2, w // 2, dim, generator=generator)
    return cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(batch, h * w, dim)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), r=st.integers(1, 48), batch=st.integers(1, 3))
def test_identical_members_attend_exactly_as_unmerged(seed, r, batch):
    g = torch.Generator().manual_seed(seed)
    grid, dim, n_text = (8, 8), 32, 5
    attn = Attention(dim, heads=2, head_dim=16, joint=True).eval()
    x = _cell_duplicated(batch, grid, dim, g)
    context = torch.randn(batch, n_text, dim, generator=g)
    n = n_text + grid[0] * grid[1]
    rope = (torch.ones(n, 16), torch.zeros(n, 16))  # no rotation: merged tables equal their members'
    tokens = match_2x2(x, grid, r, cell_destinations(grid, g))
    merge, unmerge, sizes = tokens.reduce, tokens.restore, tokens.sizes
    assert sizes.shape == (batch, grid[0] * grid[1] - r) and float(sizes.sum()) == batch * grid[0] * grid[1]
    merged_rope = tuple(torch.cat([t[:n_text].expand(batch, -1, -1), merge(t[n_text:].expand(batch, -1, -1))], 1)
                        for t in rope)
    with torch.no_grad():
        full, full_ctx = attn(x, rope, context=context)
        prop, prop_ctx = attn(merge(x), merged_rope, context=context,
                              key_bias=tokens.key_bias(n_text))
        plain, plain_ctx = attn(merge(x), merged_rope, context=context)
    torch.testing.assert_close(unmerge(prop), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prop_ctx, full_ctx, atol=1e-5, rtol=1e-5)
    if r >= 8:  # enough merged keys that plain attention visibly loses their weight
        assert not torch.allclose(plain_ctx, full_ctx, atol=1e-4)


def test_no_sizes_no_bias_and_option_wires_through():
    merge = match_2x2(torch.randn(1, 16, 4), (4, 4), 3)
    assert merge.key_bias(3) is not None
    merge.proportional = False
    assert merge.key_bias(3) is None
    torch.manual_seed(0)
    model = build_transformer("test-micro").eval()
    inputs = micro_forward_inputs(model)
    with torch.no_grad():
        apply_tomemgt(model, TomeConfig(ratio=0.5, blocks="all", schedule="constant", proportional_attention=False))
        plain = model(**inputs)
        apply_tomemgt(model, TomeConfig(ratio=0.5, blocks="all", schedule="constant"))  # the default: proportional
        proportional = model(**inputs)
        remove_tomemgt(model)
    assert not torch.allclose(plain, proportional)


def test_merged_rope_is_the_members_mean_and_text_rows_are_kept(slots_of):
    grid, batch, n_text = (8, 8), 2, 5
    ids = torch.zeros(n_text + 64, 3)
    ids[n_text:, 1] = torch.arange(64) // 8
    ids[n_text:, 2] = torch.arange(64) % 8
    cos, sin = rope_tables(ids, (4, 6, 6))
    metric = torch.randn(batch, 64, 16, generator=torch.Generator().manual_seed(0))
    dst = cell_destinations(grid, torch.Generator().manual_seed(1))
    tokens = match_2x2(metric, grid, 24, dst)
    unmerge = tokens.restore
    m_cos, m_sin = merge_rope((cos, sin), n_text, tokens, batch)
    assert m_cos.shape == (batch, n_text + 40, 16)
    slots = slots_of(unmerge, batch, 40)
    for table, merged in ((cos, m_cos), (sin, m_sin)):
        assert torch.equal(merged[:, :n_text], table[:n_text].expand(batch, -1, -1))
        for b in range(batch):
            for k in range(40):
                members = n_text + (slots[b] == k).nonzero().squeeze(1)
                torch.testing.assert_close(merged[b, n_text + k], table[members].mean(0), rtol=0, atol=1e-6)
