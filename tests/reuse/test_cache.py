"""Context reuse, model side: a full step is the plain forward; a local step equals it on the active tokens."""

import pytest
import torch

from mgtq.models import build_transformer
from mgtq.models.transformer import Attention
from mgtq.reuse import ContextCache, active_tokens, padded_indices


@pytest.fixture(scope="module", params=[True, False], ids=["compressed", "uncompressed"])
def model(request):
    torch.manual_seed(0)
    compressed = request.param
    return build_transformer("test-micro", num_layers=2, num_single_layers=2, downsample=compressed,
                             upsample=compressed).eval()


def _inputs(model, batch, seed=0, grid=(16, 16), masked=0.5):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(0, cfg.codebook_size, (batch, *grid), generator=g)
    ids = torch.where(torch.rand(batch, *grid, generator=g) < masked, model.mask_token_id, ids)
    return dict(hidden_states=ids, encoder_hidden_states=torch.randn(batch, 5, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.rand(batch, generator=g))


def _active(batch, seed, grid=(16, 16), fraction=0.1):
    return torch.rand(batch, *grid, generator=torch.Generator().manual_seed(seed)) < fraction


def test_full_step_is_the_plain_forward_bit_for_bit(model):
    inputs = _inputs(model, 2)
    with torch.no_grad():
        assert torch.equal(model(**inputs, token_hook=ContextCache().full_step()), model(**inputs))


def test_local_step_equals_the_full_step_on_active_tokens_with_different_counts_per_sample(model):
    inputs = _inputs(model, 3)
    active = _active(3, 1)
    active[1] = False
    active[1, 3, 5] = True  # one active token here, about 25 in the other samples: padded
    active[2] = False  # nothing to compute in this sample
    cache = ContextCache(bucket=8)
    with torch.no_grad():
        full = model(**inputs, token_hook=cache.full_step())
        local = model(**inputs, token_hook=cache.local_step(active))
    cells = active_tokens(active, _grid(model))  # every VQ token of an active transformer token is exact
    computed = _vq_mask(cells, model)
    assert computed[active].all()
    torch.testing.assert_close(_at(local, computed), _at(full, computed), rtol=1e-5, atol=1e-5)
    assert (_at(local, ~computed) == 0).all()  # not computed: 0


def test_local_step_logits_are_laid_out_as_the_full_steps_with_each_tokens_vocabulary_contiguous(model):
    # The sampler reads (B, N, V) rows: in NCHW a local step's logits made its softmax read across rows.
    inputs = _inputs(model, 2)
    cache = ContextCache()
    with torch.no_grad():
        full = model(**inputs, token_hook=cache.full_step())
        local = model(**inputs, token_hook=cache.local_step(_active(2, 5)))
    assert local.shape == full.shape
    for logits in (full, local):
        assert logits.is_contiguous(memory_format=torch.channels_last)
        assert logits.flatten(2).transpose(1, 2).is_contiguous()


def test_local_step_in_a_cfg_batch_uses_the_samplers_active_set_for_both_halves(model):
    single = _inputs(model, 2, seed=3)
    cfg_batch = {k: torch.cat([v, v]) if k == "hidden_states" else torch.cat([v, v.flip(0)]) for k, v in single.items()}
    active = _active(2, 4)
    cache = ContextCache()
    with torch.no_grad():
        full = model(**cfg_batch, token_hook=cache.full_step())
        local = model(**cfg_batch, token_hook=cache.local_step(active))
    computed = _vq_mask(active_tokens(active.repeat(2, 1, 1), _grid(model)), model)
    torch.testing.assert_close(_at(local, computed), _at(full, computed), rtol=1e-5, atol=1e-5)


def test_local_step_computes_only_the_active_tokens_and_no_text(model, monkeypatch):
    seen = []
    forward = Attention.forward

    def recording(self, x, *args, context=None, **kwargs):
        seen.append((x.shape[1], context is None))
        return forward(self, x, *args, context=context, **kwargs)

    monkeypatch.setattr(Attention, "forward", recording)
    inputs = _inputs(model, 1)
    active = torch.zeros(1, 16, 16, dtype=torch.bool)
    active[0, :2, :4] = True  # 8 VQ tokens: 2 transformer tokens with compression, 8 without
    cache = ContextCache()
    with torch.no_grad():
        model(**inputs, token_hook=cache.full_step())
        seen.clear()
        model(**inputs, token_hook=cache.local_step(active))
    m = int(active_tokens(active, _grid(model)).sum())
    assert seen == [(m, True)] * 4  # two joint and two single blocks: M queries each, no text stream


def test_local_step_embeds_only_the_active_tokens_cells(model):
    # Every layer before the blocks is per transformer token, so a local step embeds the f×f ids of its tokens
    # only (and the 2×2 down conv sees their cells side by side), not the whole grid.
    seen = []
    handle = model.embed.embeddings.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    inputs = _inputs(model, 2)
    active = torch.zeros(2, 16, 16, dtype=torch.bool)
    active[0, :2, :4] = True
    active[1, 4:6, 2:4] = True
    cache = ContextCache()
    try:
        with torch.no_grad():
            model(**inputs, token_hook=cache.full_step())
            model(**inputs, token_hook=cache.local_step(active))
    finally:
        handle.remove()
    f = model.grid_factor
    m = int(active_tokens(active, _grid(model)).sum(1).max())  # each sample padded to the larger count
    assert seen == [2 * 16 * 16, 2 * m * f * f]


def test_active_tokens_maps_each_2x2_cell_to_its_transformer_token():
    active = torch.zeros(1, 4, 6, dtype=torch.bool)
    active[0, 0, 1] = True  # cell (0, 0)
    active[0, 3, 4] = True  # cell (1, 2)
    assert active_tokens(active, (2, 3)).tolist() == [[True, False, False, False, False, True]]
    assert torch.equal(active_tokens(active, (4, 6)), active.reshape(1, -1))  # no compression: itself
    with pytest.raises(ValueError, match="does not tile"):
        active_tokens(active, (3, 3))


def test_padded_indices_repeat_the_first_active_token_up_to_the_bucket():
    active = torch.tensor([[False, True, False, True, True, False], [False, False, True, False, False, False],
                           [False] * 6])
    index, valid = padded_indices(active)
    assert index.tolist() == [[1, 3, 4], [2, 2, 2], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    index, valid = padded_indices(active, bucket=4)
    assert index.tolist() == [[1, 3, 4, 1], [2, 2, 2, 2], [0, 0, 0, 0]] and valid.sum(1).tolist() == [3, 1, 0]
    assert padded_indices(active, bucket=16)[0].shape == (3, 6)  # never more than N


def test_local_step_errors_name_the_fix(model):
    inputs = _inputs(model, 2)
    with pytest.raises(RuntimeError, match="full_step"):
        ContextCache().local_step(_active(2, 0))
    cache = ContextCache()
    with torch.no_grad():
        model(**inputs, token_hook=cache.full_step())
        with pytest.raises(ValueError, match="same batch"):
            model(**{k: v[:1] for k, v in inputs.items()}, token_hook=cache.local_step(_active(1, 0)))
    with pytest.raises(ValueError, match="bool mask"):
        cache.local_step(torch.zeros(2, 16, 16))


def _grid(model):
    f = model.grid_factor
    return 16 // f, 16 // f


def _vq_mask(cells, model):
    """Transformer-token mask (B, h·w) → the VQ tokens they cover (B, 16, 16)."""
    f = model.grid_factor
    h, w = _grid(model)
    return cells.reshape(-1, h, 1, w, 1).expand(-1, h, f, w, f).reshape(-1, 16, 16)


def _at(logits, mask):
    return logits.permute(0, 2, 3, 1)[mask]


def test_local_step_of_a_quantized_model_equals_its_full_step():
    from mgtq.quantization.api import W4A8Config, W4A16Config, linear_names, quantize_

    torch.manual_seed(0)
    model = build_transformer("test-micro", num_layers=2, num_single_layers=2).eval()
    names = linear_names(model)[::3]  # a third W4A8 (few-row int8 kernels in local steps), the rest W4A16
    quantize_(model, W4A16Config(), overrides={n: W4A8Config() for n in names}, input_scales={n: 0.05 for n in names})
    inputs, active = _inputs(model, 2), _active(2, 5, fraction=0.05)
    cache = ContextCache()
    with torch.no_grad():
        full = model(**inputs, token_hook=cache.full_step())
        local = model(**inputs, token_hook=cache.local_step(active))
    torch.testing.assert_close(_at(local, active), _at(full, active), rtol=1e-5, atol=1e-5)


def test_compiled_local_steps_match_and_stop_recompiling_once_lengths_are_dynamic():
    torch.manual_seed(0)
    model = build_transformer("test-micro").eval()
    inputs = _inputs(model, 2)
    cache = ContextCache(bucket=4)
    with torch.no_grad():
        model.compile_blocks(persistent_cache=False)
        full = model(**inputs, token_hook=cache.full_step())
        for seed, fraction in ((1, 0.05), (2, 0.1), (3, 0.2)):
            active = _active(2, seed, fraction=fraction)
            local = model(**inputs, token_hook=cache.local_step(active))
            torch.testing.assert_close(_at(local, active), _at(full, active), rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # a fourth length: no new graph
            model(**inputs, token_hook=cache.local_step(_active(2, 4, fraction=0.3)))



def test_compiled_local_steps_with_refresh_score_and_refresh_as_eager():
    """The scored block writes its scores in place under torch.compile(fullgraph=True), as the K/V splice does."""
    torch.manual_seed(0)
    model = build_transformer("test-micro").eval()
    inputs, active = _inputs(model, 2, seed=7, masked=0.2), _active(2, 8, fraction=0.08)

    def run():
        cache = ContextCache(bucket=4, refresh=0.3)
        logits = [model(**inputs, token_hook=cache.full_step())]
        logits += [model(**inputs, token_hook=cache.local_step(active)) for _ in range(2)]
        return logits, cache

    with torch.no_grad():
        eager, eager_cache = run()
        model.compile_blocks(persistent_cache=False)
        compiled, cache = run()
    assert cache.refreshed.any() and torch.equal(cache.refreshed, eager_cache.refreshed)
    torch.testing.assert_close(cache.attention, eager_cache.attention, rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

# ------------------------------------------------------------------------ selective K/V refresh (MARché)
class _CaptureAttention:
    """A token hook that computes every token (a plain forward) and keeps one block's queries and keys."""

    def __init__(self, block):
        self.block, self.seen = block, {}

    def bind(self, grid, masked=None):
        from mgtq.models.hooks import BlockTokens, TokenPlan

        capture = self

        class Keep(BlockTokens):
            def attention_inputs(self, q, k):
                capture.seen.update(q=q.clone(), k=k.clone())

        class Plan(TokenPlan):
            def plan(self, kind, index, x):
                return (Keep() if (kind, index) == capture.block else None), None

        return Plan()


def _refresh_setup(model, refresh=0.25):
    """Inputs with most tokens decoded, an active set, a cache after a full step and one local step (which scores)."""
    inputs = _inputs(model, 2, seed=7, masked=0.2)
    active = _active(2, 8, fraction=0.08)
    cache = ContextCache(refresh=refresh)
    with torch.no_grad():
        model(**inputs, token_hook=cache.full_step())
        model(**inputs, token_hook=cache.local_step(active))
    grid = _grid(model)
    decoded = ~active_tokens(inputs["hidden_states"] == model.mask_token_id, grid)
    return inputs, active, cache, active_tokens(active, grid), decoded


def test_refresh_scores_are_the_active_tokens_attention_in_the_last_joint_block_and_pick_the_most_attended(model):
    inputs, active, cache, active_t, decoded = _refresh_setup(model)
    assert cache.scored_block == ("joint", 1) and cache.refreshed.sum() == 0  # no scores before this local step
    capture = _CaptureAttention(("joint", 1))
    with torch.no_grad():
        model(**inputs, token_hook=capture)
    # Brute force on the plain forward (same input as the cached full step, so same queries and keys):
    # softmax(q·kᵀ/√Dh) of every query, the active ones' rows summed, heads averaged.
    q, k = capture.seen["q"], capture.seen["k"]
    probs = torch.softmax(torch.einsum("bhmd,bhsd->bhms", q, k) / q.shape[-1] ** 0.5, dim=-1)
    n_text = inputs["encoder_hidden_states"].shape[1]
    image_rows = probs[:, :, n_text:, :].mean(1)  # (B, N queries, L + N keys)
    expected = torch.einsum("bns,bn->bs", image_rows, active_t.float())[:, n_text:]
    torch.testing.assert_close(cache.attention, expected, rtol=1e-4, atol=1e-5)
    # the next local step refreshes the ⌈0.25 · decoded⌉ decoded, inactive tokens of highest score
    want = torch.zeros_like(active_t)
    for b in range(2):
        candidates = (decoded[b] & ~active_t[b]).nonzero()[:, 0]
        count = min(int(torch.ceil(0.25 * decoded[b].sum())), len(candidates))
        want[b, candidates[expected[b, candidates].topk(count).indices]] = True
    assert want.sum() > 0
    with torch.no_grad():
        model(**inputs, token_hook=cache.local_step(active))
    assert torch.equal(cache.refreshed, want)
    # refreshed queries do not score: the mass is still the active tokens' alone
    torch.testing.assert_close(cache.attention, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("refresh", [0.0, 0.3])
def test_refreshed_tokens_get_the_keys_values_a_full_step_gives_them(model, refresh):
    """Overwrite the cached keys/values of the tokens the next local step refreshes; that step must write
    back what the full step on the same input gave them (with refresh 0 they stay overwritten)."""
    inputs, active, cache, active_t, decoded = _refresh_setup(model, refresh=0.3)
    chosen = cache.to_refresh(active_t, decoded)
    assert chosen.any() and not (chosen & (active_t | ~decoded)).any()
    reference = {key: (k.clone(), v.clone()) for key, (k, v) in cache.keys_values.items()}
    cache.refresh = refresh
    rows = chosen.nonzero(as_tuple=True)
    for k, v in cache.keys_values.values():  # (B, H, L + N, Dh): the chosen tokens' rows
        k.permute(0, 2, 1, 3)[rows[0], cache.n_text + rows[1]] = 100.0
        v.permute(0, 2, 1, 3)[rows[0], cache.n_text + rows[1]] = -100.0
    with torch.no_grad():
        model(**inputs, token_hook=cache.local_step(active))
    for key, (k, v) in cache.keys_values.items():
        got = k.permute(0, 2, 1, 3)[rows[0], cache.n_text + rows[1]], v.permute(0, 2, 1, 3)[rows[0], cache.n_text + rows[1]]
        want = [t.permute(0, 2, 1, 3)[rows[0], cache.n_text + rows[1]] for t in reference[key]]
        if refresh:
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        else:
            assert (got[0] == 100.0).all() and (got[1] == -100.0).all()


def test_refresh_0_scores_nothing_and_computes_only_the_active_tokens(model):
    inputs, active, cache, active_t, _ = _refresh_setup(model, refresh=0.0)
    assert cache.attention is None  # no extra attention pass
    with torch.no_grad():
        model(**inputs, token_hook=cache.local_step(active))
    assert cache.attention is None and not cache.refreshed.any()
    assert cache.computed == pytest.approx(active_t.sum(1).float().mean().item() / active_t.shape[1])
    with pytest.raises(ValueError, match="refresh must be a fraction"):
        ContextCache(refresh=1.5)


def test_full_step_around_tomemgt_is_the_merged_forward_and_records_a_row_per_image_token(model):
    from mgtq.merging.patch import TomeConfig, TomePlan

    tome = TomePlan(TomeConfig(0.5, schedule="constant"))
    inputs = _inputs(model, 2)
    cache = ContextCache()
    with torch.no_grad():
        merged = model(**inputs, token_hook=tome)
        recorded = model(**inputs, token_hook=cache.full_step().around(tome))
        plain = model(**inputs)
    assert torch.equal(recorded, merged) and not torch.equal(merged, plain)  # TomeMGT ran inside the full step
    n = _grid(model)[0] * _grid(model)[1] + inputs["encoder_hidden_states"].shape[1]
    assert all(k.shape[2] == v.shape[2] == n for k, v in cache.keys_values.values())
    with torch.no_grad():  # a local step merges nothing and reads those rows
        local = model(**inputs, token_hook=cache.local_step(_active(2, 6)).around(tome))
    assert local.shape == plain.shape


def test_attending_to_a_merged_row_repeated_per_member_is_proportional_attention():
    import torch.nn.functional as F

    from mgtq.merging.tome import match_2x2
    from mgtq.reuse.cache import _Record

    g = torch.Generator().manual_seed(0)
    batch, heads, dh, n_text, grid = 2, 2, 8, 3, (4, 4)
    x = torch.randn(batch, 16, 12, generator=g)
    tokens = match_2x2(x, grid, 6)
    unmerge = tokens.restore
    keys, values = (torch.randn(batch, heads, n_text + 10, dh, generator=g) for _ in range(2))  # [text; 10 merged]
    q = torch.randn(batch, heads, 5, dh, generator=g)
    proportional = F.scaled_dot_product_attention(q, keys, values, attn_mask=tokens.key_bias(n_text))
    slot = []
    _Record(slot, n_text, tokens).keys_values(keys, values)
    per_token_k, per_token_v = slot
    assert per_token_k.shape == (batch, heads, n_text + 16, dh)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, per_token_k, per_token_v), proportional)
    # row by row: text rows as they were, each image token's row its merged token's
    merged_of = unmerge(torch.arange(10.0).expand(batch, 10)[..., None])[..., 0].long()  # (B, 16)
    for t, row in ((keys, per_token_k), (values, per_token_v)):
        assert torch.equal(row[:, :, :n_text], t[:, :, :n_text])
        expected = torch.stack([t[b, :, n_text + merged_of[b]] for b in range(batch)])
        assert torch.equal(row[:, :, n_text:], expected)


def test_reuse_refuses_tomemgt_without_proportional_attention():
    from mgtq.merging.patch import TomeConfig, TomePlan

    with pytest.raises(ValueError, match="proportional attention only"):
        ContextCache().full_step().around(TomePlan(TomeConfig(0.5, proportional_attention=False)))


def test_a_compiled_full_step_traces_one_graph_per_kind_of_block_not_per_block():
    # Each block records into its own list: a compiled block is not specialised to which block it is.
    from torch._dynamo.utils import counters

    from mgtq.models.presets import build_transformer
    from testkit import micro_forward_inputs

    torch._dynamo.reset()
    counters.clear()
    model = build_transformer("test-micro", num_layers=2, num_single_layers=3).eval()
    inputs = micro_forward_inputs(model)
    cache = ContextCache()
    with torch.no_grad():
        eager = model(**inputs, token_hook=cache.full_step())
        model.compile_blocks(persistent_cache=False, backend="eager")
        compiled = model(**inputs, token_hook=cache.full_step())
    assert counters["stats"]["unique_graphs"] == 2  # one joint, one single-stream
    torch.testing.assert_close(compiled, eager)
    assert sorted(cache.keys_values) == [("joint", 0), ("joint", 1), ("single", 0), ("single", 1), ("single", 2)]


def test_a_local_step_needs_a_complete_full_step():
    cache = ContextCache()
    cache.keys_values[("joint", 0)] = []  # a full step that stopped before this block recorded
    with pytest.raises(RuntimeError, match="full step first"):
        cache.local_step(torch.ones(1, 4, 4, dtype=torch.bool))
