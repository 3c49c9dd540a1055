"""Editing start states of the sampler: fixed tokens never change, the schedule counts the editable
tokens, img2img starts at the strength's step, and no start means the text-to-image sampler."""

import math

import pytest
import torch

from mgtq.sampling import SamplerConfig, mask_ratio, sample
from mgtq.sampling.start import (StartState, img2img_start, inpaint_start, num_remasked,
                                 start_step_for_strength)
from mgtq.sampling.tricks.differential import differential_selection
from mgtq.sampling.tricks.zsampling import invert_by_remasking

MASK = 99
V = 16
GRID = (6, 6)
N = GRID[0] * GRID[1]


def _model():
    """Row-wise toy model with cond/uncond branches and literal CFG (like MGTPipeline's model_fn)."""
    gen = torch.Generator().manual_seed(0)
    table_c, table_u = torch.randn(2, V, 64, generator=gen)
    emb = torch.randn(V, V, generator=gen)

    def branch(table, tokens, timestep):
        b, h, w = tokens.shape
        feats = tokens.clamp(max=V - 1).float().mean(dim=(1, 2), keepdim=True) / V + timestep[:, None, None]
        per_token = emb[tokens.clamp(max=V - 1)].permute(0, 3, 1, 2) * (tokens < V)[:, None]
        return 3 * table[:, : h * w].reshape(1, V, h, w) * feats[:, None] + per_token

    def model_fn(tokens, timestep, guidance_scale=None):
        scale = 2.0 if guidance_scale is None else guidance_scale
        cond, uncond = branch(table_c, tokens, timestep), branch(table_u, tokens, timestep)
        return uncond + scale * (cond - uncond)

    return model_fn


BASE = SamplerConfig(num_steps=7, guidance_scale=2.0, timestep_convention="mask_ratio")
CONFIGS = {
    "vanilla": BASE,
    "paper-combo": SamplerConfig.preset("paper-combo", base=BASE),
    "zsampling-random": BASE.with_overrides({"zsampling.variant": "random"}),
    "zsampling-recover": BASE.with_overrides({"zsampling.variant": "recover"}),
    "zsampling-official": BASE.with_overrides({"zsampling.variant": "masked", "zsampling.remask": "official"}),
    "momentum2": BASE.with_overrides({"momentum.order": 2, "schedule": "root", "rho": 0.6}),
    "noise-step-index": BASE.with_overrides({"noise.curve": "abs_cos", "timestep_convention": "step_index"}),
}


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _run(config, seeds, start=None, history=None):
    callback = None if history is None else (lambda step, t: history.append((step, t.clone().flatten(1))))
    return sample(_model(), len(seeds), GRID, MASK, config, _gens(seeds), progress=False, return_info=True,
                  start=start, callback=callback)


def _image_tokens(batch, seed=1):
    return torch.randint(0, V, (batch, *GRID), generator=torch.Generator().manual_seed(seed))


def _repaint(batch):
    """Different repaint regions per sample (a block, a column, one token)."""
    repaint = torch.zeros(batch, *GRID, dtype=torch.bool)
    repaint[0, 1:4, 2:5] = True
    if batch > 1:
        repaint[1, :, 0] = True
    if batch > 2:
        repaint[2, 5, 5] = True
    return repaint


@pytest.mark.parametrize("name", CONFIGS)
def test_an_all_mask_start_is_the_text_to_image_sampler(name):
    config = CONFIGS[name]
    plain = _run(config, [3, 4])
    all_mask = StartState(tokens=torch.full((2, *GRID), MASK, dtype=torch.long))
    nothing_fixed = StartState(tokens=all_mask.tokens, fixed=torch.zeros(2, *GRID, dtype=torch.bool))
    for start in (all_mask, nothing_fixed):
        out = _run(config, [3, 4], start=start)
        assert torch.equal(out.tokens, plain.tokens) and out.nfe == plain.nfe


@pytest.mark.parametrize("name", CONFIGS)
def test_inpaint_keeps_every_fixed_token_at_every_step(name):
    tokens, repaint = _image_tokens(3), _repaint(3)
    start = inpaint_start(tokens, repaint, MASK)
    history = []
    out = _run(CONFIGS[name], [0, 1, 2], start=start, history=history)
    assert torch.equal(out.tokens[~repaint], tokens[~repaint])
    for _, step_tokens in history:  # also inside the run (Z-sampling's inversion, differential)
        assert torch.equal(step_tokens.view(3, *GRID)[~repaint], tokens[~repaint])
    assert (out.tokens[repaint] < V).all()  # everything repainted was decoded


def test_inpaint_schedule_counts_the_repainted_tokens_only():
    tokens, repaint = _image_tokens(3), _repaint(3)
    history = []
    _run(BASE, [0, 1, 2], start=inpaint_start(tokens, repaint, MASK), history=history)
    editable = repaint.flatten(1).sum(-1)
    prev_masked = editable.clone()
    for step, step_tokens in history:
        masked = (step_tokens == MASK).sum(-1)
        if step == BASE.num_steps - 1:
            assert (masked == 0).all()
        else:
            target = torch.tensor([math.floor(int(n) * mask_ratio("cosine", (step + 1) / BASE.num_steps))
                                   for n in editable])
            assert torch.equal(masked, torch.clamp(torch.minimum(prev_masked - 1, target), min=1))
        prev_masked = masked


def test_inversion_never_remasks_fixed_tokens():
    before = torch.tensor([[MASK, MASK, MASK, 5, 6, 7]])
    after = torch.tensor([[1, 2, MASK, 5, 6, 7]])
    editable = torch.tensor([[True, True, True, False, False, False]])
    # inversion logits that make the fixed tokens the least likely: the paper rule would pick them first
    logits = torch.zeros(1, 6, V)
    logits[0, 0, 1] = logits[0, 1, 2] = 10.0  # the decoded editable tokens: confident
    logits[0, 3:, 0] = 10.0  # the fixed tokens 5, 6, 7: unlikely
    for variant in ("masked", "random"):
        back = invert_by_remasking(before, after, MASK, variant, _gens([0]), logits, "paper", editable=editable)
        assert back[0, 3:].tolist() == [5, 6, 7] and (back == MASK).sum() == (before == MASK).sum()
    unrestricted = invert_by_remasking(before, after, MASK, "masked", _gens([0]), logits, "paper")
    assert (unrestricted[0, 3:] == MASK).any()  # without `editable` they would have been re-masked


def test_differential_ranks_editable_positions_only():
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(2, N, V, generator=gen).softmax(-1)
    prev = torch.randn(2, N, V, generator=gen).softmax(-1)
    prev[:, :N // 2] = probs[:, :N // 2]  # KL 0 in the first half: the lowest, so chosen when allowed
    editable = torch.zeros(2, N, dtype=torch.bool)
    editable[0, N // 2:] = True
    editable[1, ::3] = True
    chosen = differential_selection(probs, prev, 50.0, editable)
    assert not (chosen & ~editable).any()
    assert chosen.sum(-1).tolist() == [int(n) // 2 for n in editable.sum(-1)]


def test_strength_runs_the_last_steps_as_diffusers_counts_them():
    config = SamplerConfig(num_steps=16)
    assert start_step_for_strength(config, 1.0) == 0
    for strength, first in ((0.5, 8), (0.8, 4), (0.7, 5), (0.99, 1), (1 / 16, 15)):
        assert start_step_for_strength(config, strength) == first  # T − int(T·strength)
    with pytest.raises(ValueError, match=r"runs no step of 16 .* at least 1/16"):
        start_step_for_strength(config, 0.06)


def test_img2img_start_remasks_what_text_to_image_holds_masked_at_its_start_step():
    tokens = _image_tokens(2)
    a = img2img_start(tokens, 0.5, MASK, BASE, _gens([0, 1]))
    again = img2img_start(tokens, 0.5, MASK, BASE, _gens([0, 1]))
    assert torch.equal(a.tokens, again.tokens)
    first = start_step_for_strength(BASE, 0.5)
    assert a.first_step == first == BASE.num_steps - int(BASE.num_steps * 0.5) > 0
    expected = int(N * mask_ratio(BASE.schedule, first / BASE.num_steps))  # ⌊N·σ(i/T)⌋, as text-to-image
    assert num_remasked(BASE, first, N) == expected
    assert ((a.tokens == MASK).flatten(1).sum(-1) == expected).all()
    assert not torch.equal(a.tokens[0] == MASK, a.tokens[1] == MASK)  # each sample's own generator
    kept = a.tokens != MASK
    assert torch.equal(a.tokens[kept], tokens[kept]) and a.fixed is None
    history = []
    _run(BASE, [0, 1], history=history)  # text-to-image: masked after step first − 1, the input of step first
    assert ((history[first - 1][1] == MASK).sum(-1) == expected).all()


@pytest.mark.parametrize("name", ["vanilla", "paper-combo", "momentum2"])
def test_img2img_runs_from_its_start_step_and_strength_one_is_text_to_image(name):
    config = CONFIGS[name]
    tokens = _image_tokens(2)
    start = img2img_start(tokens, 0.5, MASK, config, _gens([0, 1]))
    history = []
    out = _run(config, [0, 1], start=start, history=history)
    assert [step for step, _ in history] == list(range(start.first_step, config.num_steps))
    assert (out.tokens < V).all()
    full = img2img_start(tokens, 1.0, MASK, config, _gens([5, 6]))
    assert torch.equal(_run(config, [5, 6], start=full).tokens, _run(config, [5, 6]).tokens)


@pytest.mark.parametrize("strength", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_strength_outside_0_1_is_refused(strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        img2img_start(_image_tokens(1), strength, MASK, BASE, _gens([0]))


def test_bad_starts_are_refused():
    tokens = _image_tokens(2)
    with pytest.raises(ValueError, match="repaints nothing"):
        inpaint_start(tokens, torch.zeros(2, *GRID, dtype=torch.bool), MASK)
    with pytest.raises(ValueError, match="at least one masked token"):
        _run(BASE, [0, 1], start=StartState(tokens=tokens))
    with pytest.raises(ValueError, match="do not match batch"):
        _run(BASE, [0], start=inpaint_start(tokens, _repaint(2), MASK))
    with pytest.raises(ValueError, match="beyond the last step"):
        _run(BASE, [0, 1], start=StartState(tokens=torch.full((2, *GRID), MASK), first_step=7))
    with pytest.raises(ValueError, match="fixed position holds the mask id"):
        _run(BASE, [0, 1], start=StartState(tokens=torch.full((2, *GRID), MASK), fixed=_repaint(2)))
    # Z-sampling asked for at steps an edit never runs would do nothing, silently
    z_early = CONFIGS["paper-combo"].with_overrides({"zsampling.steps": [0, 1]})
    late_start = StartState(tokens=torch.full((2, *GRID), MASK), first_step=3)
    with pytest.raises(ValueError, match=r"zsampling.steps \[0, 1\] all come before this edit's first step 3"):
        _run(z_early, [0, 1], start=late_start)
    _run(z_early.with_overrides({"zsampling.steps": [1, 4]}), [0, 1], start=late_start)  # step 4 runs
    _run(z_early, [0, 1], start=StartState(tokens=torch.full((2, *GRID), MASK), first_step=1))


def test_mask_ratio_timestep_is_the_masked_fraction_of_the_editable_tokens():
    seen = []
    model = _model()

    def recording(tokens, timestep, guidance_scale=None):
        seen.append(timestep.clone())
        return model(tokens, timestep, guidance_scale)

    tokens, repaint = _image_tokens(3), _repaint(3)
    history = []
    sample(recording, 3, GRID, MASK, BASE, _gens([0, 1, 2]), progress=False, start=inpaint_start(tokens, repaint, MASK),
           callback=lambda step, t: history.append(t.clone()))
    editable = repaint.flatten(1).sum(-1)
    assert torch.equal(seen[0], torch.ones(3))  # all of the repainted region is masked: the schedule's start
    for before, t in zip(history[:-1], seen[1:]):
        assert torch.allclose(t, (before == MASK).flatten(1).sum(-1) / editable)
