"""mgtq.merging.patch: TomeMGT on a model (exact no-op, removal, batches, bf16, plans, config errors) and
through the pipeline (determinism, per-call plans, Inductor compile)."""

import pytest
import torch

from mgtq.merging import TomeConfig, TomePlan, apply_tomemgt, remove_tomemgt
from mgtq.models import build_transformer
from mgtq.sampling import SamplerConfig
from testkit import build_random_pipeline


def _inputs(model, batch, grid=(16, 16), text_len=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randint(0, cfg.vocab_size, (batch, *grid), generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.rand(batch, generator=g),
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_transformer("test-micro", num_layers=2, num_single_layers=2).eval()


def test_ratio_zero_is_bit_identical(model):
    inputs = _inputs(model, 2)
    with torch.no_grad():
        ref = model(**inputs)
        for blocks in ("joint", "single", "all"):
            apply_tomemgt(model, 0.0, blocks=blocks, merge_mlp=True)
            try:
                assert torch.equal(model(**inputs), ref)
            finally:
                remove_tomemgt(model)


def test_apply_then_remove_restores_the_model_exactly(model):
    inputs = _inputs(model, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inputs)
        plan = apply_tomemgt(model, 0.5, blocks="all", merge_mlp=True)
        assert model.token_hook is plan
        merged = model(**inputs)
        assert not torch.equal(merged, ref)
        apply_tomemgt(model, 0.25)  # re-applying replaces the plan
        assert model.token_hook.config.ratio == 0.25
        remove_tomemgt(model)
        assert model.token_hook is None
        assert torch.equal(model(**inputs), ref)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("blocks", ["joint", "single", "all"])
def test_transformer_runs_any_batch_and_rows_stay_independent(model, batch, blocks):
    inputs = _inputs(model, batch, seed=batch)
    apply_tomemgt(model, 0.5, blocks=blocks, merge_mlp=True, generator=7)
    try:
        with torch.no_grad():
            logits = model(**inputs)
            last = model(**{k: v[-1:] for k, v in inputs.items()})
    finally:
        remove_tomemgt(model)
    assert logits.shape == (batch, model.config.codebook_size, 16, 16) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[-1:], last, rtol=1e-4, atol=1e-4)


def test_micro_model_cfg_batch_and_non_square_grid():
    torch.manual_seed(0)
    micro = build_transformer("test-micro").eval()
    for batch, grid in ((2, (16, 16)), (3, (16, 16)), (2, (12, 20))):
        inputs = _inputs(micro, batch, grid=grid)
        with torch.no_grad():
            logits = micro(**inputs, token_hook=TomePlan(TomeConfig(ratio=0.5, blocks="all")))
        assert logits.shape == (batch, micro.config.codebook_size, *grid) and torch.isfinite(logits).all()


def test_bf16_runs(model):
    # TomeMGT in bf16 computes in bf16 and gives the fp32 merged logits up to bf16 rounding: relative L2
    # error about 0.01 on this model (bf16 keeps 8 significant bits through 4 blocks), so 0.03 bounds it,
    # while merging itself moves the logits by about 0.06 (the test would notice a merge gone wrong).
    def copy(dtype):
        m = build_transformer("test-micro", num_layers=2, num_single_layers=2).eval()
        m.load_state_dict(model.state_dict())
        return m.to(dtype)

    fp32, bf16 = copy(torch.float32), copy(torch.bfloat16)
    assert bf16.compute_dtype == torch.bfloat16
    inputs = _inputs(bf16, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        unmerged = bf16(**inputs)
        apply_tomemgt(fp32, 0.5, blocks="all", merge_mlp=True)
        apply_tomemgt(bf16, 0.5, blocks="all", merge_mlp=True)
        logits = bf16(**inputs)
        ref = fp32(**_inputs(fp32, 2))
    assert logits.dtype == torch.bfloat16 and logits.shape == ref.shape
    assert (logits.float() - ref).norm() / ref.norm() < 0.03
    assert (unmerged.float() - ref).norm() / ref.norm() > 0.03


def test_same_seed_same_output_whatever_ran_before(model):
    inputs, other = _inputs(model, 2, seed=0), _inputs(model, 3, seed=9)
    with torch.no_grad():
        apply_tomemgt(model, 0.5, generator=torch.Generator().manual_seed(5))
        first = model(**inputs)
        model(**other)  # another image (different batch) in between must not change anything
        again = model(**inputs)
        apply_tomemgt(model, 0.5, generator=torch.Generator().manual_seed(5))
        reapplied = model(**inputs)
        apply_tomemgt(model, 0.5, generator=torch.Generator().manual_seed(6))
        other_seed = model(**inputs)
        remove_tomemgt(model)
    assert torch.equal(first, again) and torch.equal(first, reapplied)
    assert not torch.equal(first, other_seed)


def test_recompute_every_reuses_matching_within_one_forward_only():
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    plan = TomePlan(TomeConfig(ratio=0.5, blocks="all", recompute_every=2))
    forward = plan.bind((8, 8))
    m0, _ = forward.plan("joint", 0, x)
    m1, _ = forward.plan("joint", 1, x * 0 + torch.randn_like(x))
    m2, _ = forward.plan("joint", 2, x)
    s0, _ = forward.plan("single", 0, x)
    assert m1 is m0 and m2 is not m0 and s0 is not m0
    assert plan.bind((8, 8)).plan("joint", 1, x)[0] is not m0  # a new forward never sees the old one


def test_plan_only_touches_the_chosen_blocks():
    x = torch.randn(2, 64, 16)
    joint_only = TomePlan(TomeConfig(ratio=0.5)).bind((8, 8))
    assert joint_only.plan("single", 0, x) == (None, None)
    merge, merge_mlp = joint_only.plan("joint", 0, x)
    assert merge is not None and merge_mlp is None
    merge, merge_mlp = TomePlan(TomeConfig(ratio=0.5, merge_mlp=True)).bind((8, 8)).plan("joint", 0, x)
    assert merge_mlp is merge
    with pytest.raises(ValueError, match="unknown block kind"):
        joint_only.plan("cross", 0, x)


def test_step_salt_changes_destinations_deterministically():
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0))
    plan = TomePlan(TomeConfig(ratio=0.5))

    def merged(p):
        return p.bind((8, 8)).plan("joint", 0, x)[0].reduce(x)

    assert torch.equal(merged(plan), merged(plan)) and torch.equal(merged(plan.at_step(3)), merged(plan.at_step(3)))
    assert not torch.equal(merged(plan), merged(plan.at_step(3)))


@pytest.mark.parametrize("bad, message", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(ratio="0.5"), "ratio"),
    (dict(blocks="mmdit"), "blocks must be one of"), (dict(recompute_every=0), "recompute_every"),
    (dict(merge_mlp=1), "merge_mlp"), (dict(locality="near"), "locality must be one of"),
    (dict(window=4), "window must be an odd integer"), (dict(window=1), "window"),
    (dict(sources="mask"), "sources must be one of"), (dict(schedule="cosine"), "schedule must be one of"),
])
def test_config_errors_say_what_to_do(bad, message):
    with pytest.raises(ValueError, match=message):
        TomeConfig(**bad)


def test_config_from_dict_names_unknown_keys_and_apply_checks_its_target(model):
    assert TomeConfig.from_dict({"ratio": 0.3, "blocks": "all"}) == TomeConfig(ratio=0.3, blocks="all")
    with pytest.raises(ValueError, match="ratoi"):
        TomeConfig.from_dict({"ratoi": 0.3})
    with pytest.raises(TypeError, match="MGTPipeline or a MeissonicTransformer"):
        apply_tomemgt(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(TypeError, match="put every setting in the TomeConfig"):
        apply_tomemgt(model, TomeConfig(ratio=0.5), blocks="all")
    with pytest.raises(ValueError, match="localty"):
        apply_tomemgt(model, 0.5, localty="cell")
    plan = apply_tomemgt(model, 0.5, locality="global", sources="decoded", schedule="decoded", generator=3)
    assert plan.config == TomeConfig(ratio=0.5, locality="global", sources="decoded", schedule="decoded", seed=3)
    remove_tomemgt(model)
    model.token_hook = object()
    try:
        with pytest.raises(ValueError, match="did not install"):
            apply_tomemgt(model, 0.5)
    finally:
        model.token_hook = None


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline()


@pytest.mark.parametrize("prompts, guidance", [(["a red circle"], 3.0), (["a red circle", "a blue square"], 3.0),
                                                (["a", "red", "circle"], 1.0)])
def test_pipeline_with_tomemgt_any_batch_is_deterministic(pipe, prompts, guidance):
    # CFG batch 2 (one prompt), 4 (two prompts) and a plain batch of 3 at the transformer.
    sampler = pipe.settings.sampler.replace(num_steps=3, guidance_scale=guidance)
    apply_tomemgt(pipe, 0.5, blocks="all", merge_mlp=True, generator=1)
    try:
        out = pipe(prompts, seed=4, sampler=sampler, progress=False, output_type="tokens").tokens
        pipe(["two green triangles"], seed=11, sampler=sampler, progress=False, output_type="tokens")
        again = pipe(prompts, seed=4, sampler=sampler, progress=False, output_type="tokens").tokens
    finally:
        remove_tomemgt(pipe)
    assert out.shape == (len(prompts), 16, 16) and out.max() < pipe.transformer.config.codebook_size
    assert torch.equal(out, again)


def test_pipeline_per_call_plan_and_decoded_images(pipe):
    plan = TomePlan(TomeConfig(ratio=0.5))
    sampler = SamplerConfig(num_steps=2, guidance_scale=3.0, timestep_convention="mask_ratio")
    images = pipe("a red circle", seed=0, sampler=sampler, progress=False, token_merging=plan).images
    assert pipe.transformer.token_hook is None and images[0].size == (64, 64)


def test_a_call_with_ratio_0_merges_nothing_where_a_plan_is_installed():
    import mgtq

    pipe = mgtq.load(progress=False)
    kwargs = dict(prompt="a red circle", seed=0, num_inference_steps=4, progress=False, output_type="latent")
    plain = pipe(**kwargs).images
    apply_tomemgt(pipe, 0.5)
    try:
        merged = pipe(**kwargs).images
        assert not torch.equal(merged, plain)  # the installed plan merges
        for off in (0, 0.0, TomeConfig(ratio=0.0)):
            assert torch.equal(pipe(token_merging=off, **kwargs).images, plain)
        assert torch.equal(pipe(token_merging=None, **kwargs).images, merged)  # None: the installed one
        fast = pipe.settings.sampler.preset("fast")  # context reuse runs its full steps around the per-call hook
        assert torch.equal(pipe(token_merging=0, sampler=fast, **kwargs).images,
                           mgtq.load(progress=False)(sampler=fast, **kwargs).images)
    finally:
        remove_tomemgt(pipe)


def test_tomemgt_under_inductor_compile_gives_the_eager_tokens():
    """pipe.compile() (Inductor, block by block) lowers the merged forward while r changes from step to step;
    it used to fail with "Exponent must be non-negative" (merge/unmerge views sized by the int r)."""
    import mgtq

    pipe = mgtq.load(progress=False)
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False, num_inference_steps=3,
                  token_merging=0.5)
    eager = pipe(**kwargs).images
    torch._dynamo.reset()
    pipe.compile(persistent_cache=False)
    assert torch.equal(pipe(**kwargs).images, eager)


def test_config_locality_choices_are_the_matchings_localities():
    from typing import get_args, get_type_hints

    from mgtq.merging.tome import LOCALITIES

    assert get_args(get_type_hints(TomeConfig)["locality"]) == LOCALITIES


@pytest.mark.parametrize("sources", ["decoded", "masked"])
def test_a_batch_of_samples_that_merge_different_counts_gives_each_its_image_alone(pipe, sources, monkeypatch):
    # mask-aware sources: how many transformer tokens may merge differs per sample, so r does
    from mgtq.merging import patch

    uneven, match = [], patch.match_2x2
    monkeypatch.setattr(patch, "match_2x2", lambda *a, **k: (lambda m: uneven.append(
        m is not None and m.weights is not None) or m)(match(*a, **k)))
    sampler = pipe.settings.sampler.replace(num_steps=6)
    merging = TomeConfig(ratio=0.75, sources=sources, blocks="all")
    kwargs = dict(sampler=sampler, progress=False, output_type="latent", token_merging=merging)
    batch = pipe(["a red circle", "two blue squares"], seed=[0, 1], **kwargs).tokens
    assert any(uneven), sources  # some block did merge different counts in this batch
    for b, (prompt, seed) in enumerate([("a red circle", 0), ("two blue squares", 1)]):
        assert torch.equal(batch[b], pipe(prompt, seed=seed, **kwargs).tokens[0]), (sources, b)


def test_uneven_counts_pad_the_merged_sequences_with_rows_nothing_reads():
    from mgtq.merging.tome import match_2x2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=g)
    merge = match_2x2(x, (4, 4), [3, 6])  # 4×4 grid: 4 destinations, 12 sources
    reduced = merge.reduce(x)
    assert reduced.shape == (2, 13, 8)  # N − min r
    assert merge.sizes[0].tolist().count(0.0) == 0 and merge.sizes[1, 10:].tolist() == [0.0, 0.0, 0.0]
    assert merge.sizes[0].sum() == 16 and merge.sizes[1].sum() == 16  # every token counted once, padding none
    for b, r in enumerate((3, 6)):
        alone = match_2x2(x[b:b + 1], (4, 4), r)
        assert torch.equal(reduced[b, : 16 - r], alone.reduce(x[b:b + 1])[0])
        assert torch.equal(merge.restore(reduced)[b], alone.restore(alone.reduce(x[b:b + 1]))[0])
    bias = merge.key_bias(n_text=2)
    assert bias.shape == (2, 1, 1, 15) and torch.isinf(bias[1, 0, 0, -3:]).all() and torch.isfinite(bias[0]).all()
    merge.proportional = False
    assert torch.equal(merge.key_bias(2)[:, 0, 0, :12], torch.zeros(2, 12))  # padding masked without proportions
    assert torch.isinf(merge.key_bias(2)[1, 0, 0, -3:]).all()
