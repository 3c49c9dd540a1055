"""mgtq.sampling.tricks.reuse: grouped decoding (the group's size is the schedule's count, its members the
most confident), and the sampler loop with context reuse (config.reuse): off is the plain sampler, on follows
its schedule."""

import pytest
import torch

from mgtq.merging import TomeConfig
from mgtq.reuse import ContextCache, active_tokens
from mgtq.sampling import SamplerConfig
from mgtq.sampling.maskgit import num_to_mask, sample
from mgtq.sampling.tricks.reuse import decoded_until, most_confident


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


PROMPTS = ["a red circle", "two blue squares"]


# mask ratios as timesteps: on this random model they make the context matter more than step indices do (the
# [masked] schedule below changes 5 of the 512 tokens at seed 0 with them, none with step indices)
BASE = SamplerConfig(num_steps=8, guidance_scale=3.0, timestep_convention="mask_ratio")


def _config(interval=1, **reuse):
    return BASE.replace(reuse=dict(interval=interval, **reuse))


def _run(pipe, config, **kwargs):
    steps = []

    def record(p, step, timestep, kw):
        steps.append(kw["tokens"].clone())
        return kw

    out = pipe(PROMPTS, seed=0, sampler=config, progress=False, output_type="latent", callback_on_step_end=record,
               **kwargs)
    return out, steps


def test_interval_1_is_the_plain_sampler_bit_for_bit(random_pipeline):
    plain, _ = _run(random_pipeline, BASE)
    off, _ = _run(random_pipeline, _config(interval=1, group="masked", warmup=2))
    assert torch.equal(off.tokens, plain.tokens) and off.local_nfe == 0 and off.nfe == plain.nfe == 8
    assert off.token_nfe == plain.token_nfe == 8.0


@pytest.mark.parametrize("group", ["confidence", "cells", "masked"])
def test_local_steps_follow_the_schedule_and_decode_only_what_they_computed(random_pipeline, monkeypatch, group):
    actives = {}
    local_step = ContextCache.local_step

    def recording(self, active):
        actives[len(actives)] = active.clone()
        return local_step(self, active)

    monkeypatch.setattr(ContextCache, "local_step", recording)
    mask_id = random_pipeline.transformer.mask_token_id
    _, plain = _run(random_pipeline, _config())
    out, steps = _run(random_pipeline, _config(interval=3, group=group, warmup=1))
    # full steps at 0 (warm-up), 1, 4, 7; local steps at 2, 3, 5, 6
    assert out.nfe == 8 and out.local_nfe == 4 and len(actives) == 4
    assert [int((s == mask_id).sum()) for s in steps] == [int((s == mask_id).sum()) for s in plain]
    assert not (out.tokens == mask_id).any()
    for k, step in enumerate((2, 3, 5, 6)):
        decoded = (steps[step - 1] == mask_id) & (steps[step] != mask_id)
        assert decoded.any() and not (decoded & ~actives[k]).any()
    assert not torch.equal(out.tokens, plain[-1])  # local steps see stale context: a different image
    side = 16 // random_pipeline.transformer.grid_factor  # token NFE: each local step as its computed fraction
    fractions = [active_tokens(a, (side, side)).sum(1).float().mean().item() / side**2 for a in actives.values()]
    assert out.token_nfe == pytest.approx(4 + sum(fractions)) and out.token_nfe < 8


def test_same_seed_same_image_with_reuse(random_pipeline):
    config = _config(interval=2)
    assert torch.equal(_run(random_pipeline, config)[0].tokens, _run(random_pipeline, config)[0].tokens)


def test_combinations_left_out_are_clear_errors(random_pipeline):
    with pytest.raises(ValueError, match="does not combine with differential sampling"):
        random_pipeline("a", sampler=_config(interval=2).replace(differential={"percent": 75}), progress=False)
    with pytest.raises(ValueError, match="Z-sampling"):
        random_pipeline("a", sampler=_config(interval=2).replace(zsampling={"variant": "masked"}), progress=False)
    with pytest.raises(TypeError, match="no token_hook parameter"):
        sample(lambda tokens, timestep: None, 1, (4, 4), 39, _config(interval=2), [torch.Generator()])


def test_editing_with_reuse_keeps_the_fixed_tokens_and_decodes_the_rest(random_pipeline):
    import numpy as np
    from PIL import Image

    from mgtq.editing import MGTImg2ImgPipeline, MGTInpaintPipeline, token_mask

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pixels = np.zeros((64, 64), dtype=bool)
    pixels[8:40, 16:48] = True
    mask_id = random_pipeline.transformer.mask_token_id
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    out = inpaint("a red circle", image=image, mask_image=pixels, sampler=_config(interval=3), progress=False)
    repaint = token_mask(pixels, 4)  # the random pipeline's VQ factor
    assert torch.equal(out.tokens[0][~repaint], inpaint.encode_image(image)[0][~repaint])
    assert out.local_nfe > 0 and not (out.tokens == mask_id).any()
    out = MGTImg2ImgPipeline.from_pipe(random_pipeline)("a red circle", image=image, strength=0.6,
                                                        sampler=_config(interval=2), progress=False)
    assert out.local_nfe > 0 and not (out.tokens == mask_id).any()


def _recording_refresh(monkeypatch):
    refreshed = []
    to_refresh = ContextCache.to_refresh

    def recording(self, active, decoded):
        chosen = to_refresh(self, active, decoded)
        refreshed.append((chosen.clone(), active.clone(), decoded.clone()))
        return chosen

    monkeypatch.setattr(ContextCache, "to_refresh", recording)
    return refreshed


def test_refresh_0_and_a_refresh_that_never_triggers_are_todays_reuse_bit_for_bit(random_pipeline, monkeypatch):
    """With interval 2 every local step directly follows a full step, whose cache is fresh: nothing is scored
    or refreshed, so any refresh gives reuse without refresh, token for token."""
    refreshed = _recording_refresh(monkeypatch)
    without, _ = _run(random_pipeline, _config(interval=2, warmup=1))
    with_refresh, _ = _run(random_pipeline, _config(interval=2, warmup=1, refresh=0.5))
    assert torch.equal(with_refresh.tokens, without.tokens) and with_refresh.token_nfe == without.token_nfe
    assert with_refresh.local_nfe == without.local_nfe > 0 and not any(chosen.any() for chosen, _, _ in refreshed)


def test_refresh_recomputes_decoded_context_and_still_decodes_only_the_group(random_pipeline, monkeypatch):
    refreshed = _recording_refresh(monkeypatch)
    mask_id = random_pipeline.transformer.mask_token_id
    plain, _ = _run(random_pipeline, _config(interval=4, warmup=1, group="cells"))
    assert not any(chosen.any() for chosen, _, _ in refreshed)  # refresh 0: nothing chosen
    refreshed.clear()
    out, steps = _run(random_pipeline, _config(interval=4, warmup=1, group="cells", refresh=0.25))
    # full steps at 0, 1, 5; local steps at 2, 3, 4 and 6, 7: the first after a full step has no scores yet,
    # later ones refresh once there are decoded transformer tokens outside the group
    assert out.local_nfe == plain.local_nfe == 5 and len(refreshed) == 5
    assert not refreshed[0][0].any() and not refreshed[3][0].any() and refreshed[4][0].any()
    for chosen, active, decoded in refreshed:  # decoded context only, ⌈0.25 · decoded⌉ (or all candidates)
        count = torch.minimum(torch.ceil(0.25 * decoded.sum(1)).long(), (decoded & ~active).sum(1))
        assert not (chosen & (active | ~decoded)).any() and torch.equal(chosen.sum(1), count * (chosen.sum(1) > 0))
    assert out.token_nfe > plain.token_nfe  # the refreshed rows are computed, and counted
    assert not (out.tokens == mask_id).any()
    assert torch.equal(_run(random_pipeline, _config(interval=4, warmup=1, group="cells", refresh=0.25))[0].tokens,
                       out.tokens)  # same seed, same image


def test_tomemgt_runs_inside_the_full_steps_of_reuse(random_pipeline, monkeypatch):
    from mgtq.merging.patch import TomePlan

    tome = TomeConfig(0.5, schedule="constant")
    merged, merged_steps = _run(random_pipeline, _config(), token_merging=tome)
    binds = []
    bind = TomePlan.bind
    monkeypatch.setattr(TomePlan, "bind", lambda self, grid, masked=None: binds.append(1) or bind(self, grid, masked))
    both, both_steps = _run(random_pipeline, _config(interval=3, warmup=3), token_merging=tome)
    assert not (both.tokens == random_pipeline.transformer.mask_token_id).any() and both.local_nfe > 0
    assert len(binds) == both.nfe - both.local_nfe  # every full step merges, no local step does
    for step in range(3):  # full steps: TomeMGT's forward, the plain sampler's draws
        assert torch.equal(both_steps[step], merged_steps[step])
    assert torch.equal(_run(random_pipeline, _config(interval=3, warmup=3), token_merging=tome)[0].tokens, both.tokens)


def test_a_per_call_token_hook_still_replaces_the_installed_one(random_pipeline):
    # Only context reuse's hooks run the installed TomeMGT inside them; any other per-call hook (a custom
    # loop's TomePlan.at_step(i)) replaces it, as before reuse and TomeMGT combined.
    from mgtq.merging.patch import TomePlan

    transformer, g = random_pipeline.transformer, torch.Generator().manual_seed(0)
    cfg = transformer.config
    text = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    micro = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0]])
    installed = TomePlan(TomeConfig(0.5, schedule="constant"))
    per_call = TomePlan(TomeConfig(0.25, schedule="constant")).at_step(1)
    model_fn = random_pipeline.guided_model_fn(text, pooled, micro, SamplerConfig(num_steps=4, guidance_scale=1.0),
                                               token_hook=installed)
    tokens = torch.randint(0, cfg.codebook_size, (1, 16, 16), generator=g)
    with torch.no_grad():
        out = model_fn(tokens, torch.tensor([0.5]), token_hook=per_call)
        expected = transformer(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled,
                               timestep=torch.tensor([0.5]), micro_conds=micro, token_hook=per_call).float()
    assert torch.equal(out, expected)


def test_a_step_callback_that_changes_the_tokens_makes_the_next_step_full(random_pipeline, monkeypatch):
    kinds = []
    full_step, local_step = ContextCache.full_step, ContextCache.local_step
    monkeypatch.setattr(ContextCache, "full_step", lambda self: kinds.append("full") or full_step(self))
    monkeypatch.setattr(ContextCache, "local_step", lambda self, a: kinds.append("local") or local_step(self, a))
    mask_id, codebook = random_pipeline.transformer.mask_token_id, random_pipeline.transformer.config.codebook_size
    config = _config(interval=3, group="cells", warmup=1)  # full at 0, 1, 4, 7; local at 2, 3, 5, 6
    _run(random_pipeline, config)
    assert kinds == ["full", "full", "local", "local", "full", "local", "local", "full"]
    for edit in ("remask", "replace"):
        kinds.clear()
        edited = []

        def callback(p, step, timestep, kw, edit=edit):
            flat = kw["tokens"].flatten(1)
            if step == 1:  # after the full step that planned steps 2 and 3
                rows, cols = (flat != mask_id).nonzero()[:3].unbind(1)
                flat[rows, cols] = mask_id if edit == "remask" else (flat[rows, cols] + 1) % codebook
                edited.append((rows, cols, flat[rows, cols].clone()))
            return kw

        out = random_pipeline(PROMPTS, seed=0, sampler=config, progress=False, output_type="latent",
                              callback_on_step_end=callback)
        # step 2 runs full (its plan and cached context were made for other tokens), then the schedule goes on
        assert kinds == ["full", "full", "full", "local", "full", "local", "local", "full"], edit
        rows, cols, values = edited[0]
        final = out.tokens.flatten(1)[rows, cols]
        assert not (out.tokens == mask_id).any() and (final < codebook).all()  # re-masked ones decoded again
        if edit == "replace":
            assert torch.equal(final, values)  # a decoded token the callback set is kept
