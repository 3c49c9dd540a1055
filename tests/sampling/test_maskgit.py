"""mgtq.sampling.maskgit: the sampling loop, vanilla (schedule bookkeeping, decoded tokens stay, determinism per
sample) and enhanced (arXiv 2411.10781 §3): neutral settings are vanilla, each trick does what its equation says,
no state leaks, NFE is counted, token bookkeeping follows the schedule."""

import argparse
import math

import pytest
import torch

from mgtq.sampling import SamplerConfig, SamplerHooks, mask_ratio, maskgit, sample
from mgtq.sampling.cli_args import add_sampler_arguments, sampler_config_from_args
from mgtq.sampling.maskgit import momentum_coefficient
from mgtq.sampling.tokens import sample_tokens, standard_normal
from mgtq.sampling.tricks import noise as noise_module
from mgtq.sampling.tricks.momentum import second_order_coefficient, second_order_probs
from mgtq.sampling.tricks.zsampling import invert_by_remasking

MASK = 99
V = 16
GRID = (4, 4)
N = GRID[0] * GRID[1]


def _toy_model(guidance_scale=1.0, seed=0, calls=None):
    """Row-wise toy transformer with a cond and an uncond branch and CFG, like MGTPipeline's model_fn."""
    gen = torch.Generator().manual_seed(seed)
    table_c, table_u = torch.randn(2, V, 64, generator=gen)
    emb = torch.randn(V, V, generator=gen)

    def branch(table, tokens, timestep):
        b, h, w = tokens.shape
        feats = tokens.clamp(max=V - 1).float().mean(dim=(1, 2), keepdim=True) / V + timestep[:, None, None]
        per_token = emb[tokens.clamp(max=V - 1)].permute(0, 3, 1, 2) * (tokens < V)[:, None]  # (B, V, H, W)
        return 3 * table[:, : h * w].reshape(1, V, h, w) * feats[:, None] + per_token

    def model_fn(tokens, timestep, guidance_scale=None):
        scale = default_scale if guidance_scale is None else guidance_scale
        if calls is not None:
            calls.append(guidance_scale)
        cond = branch(table_c, tokens, timestep)
        if guidance_scale is None and scale <= 1.0:
            return cond
        uncond = branch(table_u, tokens, timestep)
        return uncond + scale * (cond - uncond)

    default_scale = guidance_scale
    return model_fn


def _config(**kw):
    base = dict(num_steps=6, guidance_scale=1.0, timestep_convention="mask_ratio")
    return SamplerConfig(**{**base, **kw})


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _run(config, seeds, cfg=1.0, calls=None, **kw):
    model = _toy_model(guidance_scale=cfg, calls=calls)
    return sample(model, len(seeds), GRID, MASK, config, _gens(seeds), progress=False, return_info=True, **kw)


TRICKS = {
    "noise": {"noise": {"curve": "abs_cos", "scale": 2.0}},
    "noise_piecewise": {"noise": {"curve": "piecewise", "knots": [[0, 1], [0.5, 0], [1, 2]]}},
    "differential": {"differential": {"percent": 75}},
    "zsampling_masked": {"zsampling": {"variant": "masked"}},
    "zsampling_random": {"zsampling": {"variant": "random"}},
    "zsampling_recover": {"zsampling": {"variant": "recover"}},
    "momentum2": {"momentum": {"order": 2}, "schedule": "root", "rho": 0.6},
    "paper-combo": None,
    "everything": {"schedule": "pow", "rho": 2.0, "noise": {"curve": "half_abs_cos"}, "differential": {"percent": 50},
                   "zsampling": {"variant": "masked", "inversion_cfg": 0.5, "steps": [0, 2]}, "momentum": {"order": 2}},
}


def _trick_config(name, **kw):
    if TRICKS[name] is None:
        return SamplerConfig.preset(name, base=_config(**kw))
    return _config(**kw).with_overrides(_flat(TRICKS[name]))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


NEUTRAL = {
    "noise_scale_0": {"noise": {"curve": "abs_cos", "scale": 0.0}},
    "noise_off": {"noise": {"curve": "off", "scale": 5.0}},
    "differential_0": {"differential": {"percent": 0}},
    "no_z_step": {"zsampling": {"variant": "masked", "steps": []}},
    "momentum_0": {"momentum": {"order": 0}},
    "momentum_1": {"momentum": {"order": 1}},  # Eq. 4: the first-order solver is the MaskGIT step
}


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("name", NEUTRAL)
def test_each_trick_at_its_neutral_setting_is_vanilla(name, cfg):
    vanilla = _run(_config(), [1, 2, 3], cfg=cfg)
    neutral = _run(_config().with_overrides(_flat(NEUTRAL[name])), [1, 2, 3], cfg=cfg)
    assert torch.equal(vanilla.tokens, neutral.tokens)
    assert vanilla.nfe == neutral.nfe == 6


def test_vanilla_preset_is_the_default_sampler():
    base = _config(guidance_scale=4.0)
    assert SamplerConfig.preset("vanilla", base=base) == base
    assert SamplerConfig.preset("vanilla") == SamplerConfig()


class _Recorder(SamplerHooks):
    """Records, per unmask step, the model's guided logits (B, N, V), the logits after noise regularization,
    p_i (the prediction after softmax) and the distribution the step samples from (after the momentum
    solver and differential sampling); with Z-sampling, also every model call's input and guidance scale."""

    def __init__(self, monkeypatch, cfg=1.0):
        self.raw, self.noised, self.predictions, self.sampled, self.eps, self.calls = [], [], [], [], [], []
        model = _toy_model(guidance_scale=cfg)

        def model_fn(tokens, timestep, guidance_scale=None):
            logits = model(tokens, timestep, guidance_scale=guidance_scale)
            self.calls.append((tokens.flatten(1).clone(), guidance_scale, logits.flatten(2).transpose(1, 2)))
            return logits

        self.model_fn = model_fn

        def sampling(probs, generators, rows=None):
            self.sampled.append(probs.float().clone())
            return sample_tokens(probs, generators, rows)

        def noise(shape, generators, device):
            self.eps.append(standard_normal(shape, generators, device))
            return self.eps[-1]

        monkeypatch.setattr(maskgit, "sample_tokens", sampling)
        monkeypatch.setattr(noise_module, "standard_normal", noise)

    def adjust_logits(self, logits, state):
        self.raw.append(self.calls[-1][2])
        self.noised.append(logits.float().clone())
        return logits

    def adjust_probs(self, probs, state):
        self.predictions.append(probs.float().clone())
        return probs

    def run(self, config, seeds=(1, 2, 3)):
        return sample(self.model_fn, len(seeds), GRID, MASK, config, _gens(seeds), hooks=self, progress=False,
                      return_info=True)


def test_noise_regularization_adds_intensity_times_eps_to_the_guided_logits(monkeypatch):
    # ℓ ← ℓ + I(t)·ε after CFG, before softmax, I(t) = α|cos πt|, t = i/(T−1), ε ~ N(0, I) per sample
    rec = _Recorder(monkeypatch, cfg=3.0)
    config = _trick_config("noise")
    rec.run(config)
    assert len(rec.eps) == len(rec.noised) == config.num_steps
    for i, (raw, noised, eps) in enumerate(zip(rec.raw, rec.noised, rec.eps)):
        intensity = 2.0 * abs(math.cos(math.pi * i / (config.num_steps - 1)))
        assert intensity > 0 and eps.abs().max() > 0
        torch.testing.assert_close(noised - raw.float(), intensity * eps)
        torch.testing.assert_close(rec.predictions[i], noised.softmax(-1))  # nothing else touches p_i
        torch.testing.assert_close(rec.sampled[i], rec.predictions[i])


def test_differential_sampling_resamples_the_lowest_kl_tokens_from_the_difference(monkeypatch):
    # d_j = KL(p_i^j ‖ p_{i−1}^j); the ⌊z·N/100⌋ tokens of lowest d_j are drawn from |p_i − p_{i−1}| normalized,
    # the others from p_i; p_{i−1} is the previous step's prediction of the same call, none at step 0
    rec = _Recorder(monkeypatch)
    config = _trick_config("differential")
    rec.run(config)
    torch.testing.assert_close(rec.sampled[0], rec.predictions[0])
    k = N * 75 // 100
    for i in range(1, config.num_steps):
        p, prev, drawn = rec.predictions[i], rec.predictions[i - 1], rec.sampled[i]
        kl = (p * (p / prev).log()).sum(-1)  # (B, N); the toy model's probabilities are never 0
        lowest = torch.zeros_like(kl, dtype=torch.bool).scatter_(1, kl.argsort(-1)[:, :k], True)
        resampled = ~torch.isclose(drawn, p).all(-1)
        assert torch.equal(resampled, lowest), f"step {i}"
        diff = (p - prev).abs()
        torch.testing.assert_close(drawn[lowest], (diff / diff.sum(-1, keepdim=True))[lowest])


def test_masked_zsampling_runs_the_inversion_pass_and_remasks_its_least_confident_tokens(monkeypatch):
    # each Z-step: z_i → z_{i+1}; one pass on z_{i+1} with the inversion CFG; z̃_i = z_{i+1} with the k decoded
    # tokens of lowest log p_inv(x_j) re-masked (k = #masked(z_i) − #masked(z_{i+1})); z̃_i → z_{i+1} again
    rec = _Recorder(monkeypatch, cfg=3.0)
    config = _trick_config("zsampling_masked").with_overrides({"zsampling.inversion_cfg": -1.0})
    result = rec.run(config)
    z_steps = config.num_steps - 1  # every step but the last
    assert result.nfe == len(rec.calls) == 3 * z_steps + 1
    for s in range(z_steps):
        (z_i, scale_i, _), (z_next, scale_inv, inv_logits), (z_back, scale_again, _) = rec.calls[3 * s: 3 * s + 3]
        assert (scale_i, scale_inv, scale_again) == (None, -1.0, None)
        masked_i, masked_next, masked_back = (z == MASK for z in (z_i, z_next, z_back))
        assert torch.equal(masked_back.sum(-1), masked_i.sum(-1)) and (masked_next.sum(-1) < masked_i.sum(-1)).all()
        confidence = inv_logits.float().log_softmax(-1).gather(-1, z_next.clamp(max=V - 1)[..., None])[..., 0]
        confidence = confidence.masked_fill(masked_next, float("inf"))
        for b in range(z_i.shape[0]):
            k = int(masked_i[b].sum() - masked_next[b].sum())
            expected = set(confidence[b].argsort()[:k].tolist())
            assert set((masked_back[b] & ~masked_next[b]).nonzero()[:, 0].tolist()) == expected
            assert torch.equal(z_back[b][~masked_back[b]], z_next[b][~masked_back[b]])  # nothing else changes


def test_second_order_momentum_adds_the_difference_term_of_eq_13(monkeypatch):
    # D = p_i + c(p_i − p_{i−1}), c = h/(2h'), h = λ(σ_{i+1}) − λ(σ_i), h' = λ(σ_i) − λ(σ_{i−1}), λ(σ) = log((1−σ)/σ),
    # σ_j = 1 − (j/T)^ρ; D clamped at 0 and renormalized; first order (c = 0) where λ is not finite
    rec = _Recorder(monkeypatch)
    config = _trick_config("momentum2")
    counts = []
    sample(rec.model_fn, 3, GRID, MASK, config, _gens([1, 2, 3]), hooks=rec, progress=False,
           callback=lambda step, tokens: counts.append((tokens == MASK).sum()))
    vanilla_counts = []
    _run(_config(schedule="root", rho=0.6), [1, 2, 3], callback=lambda step, tokens: vanilla_counts.append(
        (tokens == MASK).sum()))
    assert counts == vanilla_counts  # the term changes which tokens, never how many

    def lam(sigma):
        return math.log((1 - sigma) / sigma) if 0 < sigma < 1 else None

    steps_with_term = 0
    for i in range(config.num_steps):
        p, drawn = rec.predictions[i], rec.sampled[i]
        lams = [lam(1 - ((i + d) / config.num_steps) ** 0.6) for d in (-1, 0, 1)] if i else [None]
        if None in lams:
            torch.testing.assert_close(drawn, p)
            continue
        c = (lams[2] - lams[1]) / (2 * (lams[1] - lams[0]))
        d = (p + c * (p - rec.predictions[i - 1])).clamp_min(0)
        torch.testing.assert_close(drawn, d / d.sum(-1, keepdim=True))
        assert not torch.allclose(drawn, p)
        steps_with_term += 1
    assert steps_with_term == config.num_steps - 3  # not at step 0, 1 (σ_{i−1} = 1) or the last (σ_{i+1} = 0)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("name", TRICKS)
def test_same_seed_same_tokens_whatever_ran_before_at_any_batch_position(name, cfg):
    config = _trick_config(name)
    alone = _run(config, [7], cfg=cfg).tokens[0]
    _run(_trick_config("everything"), [3, 4, 5], cfg=cfg)  # something else in between
    _run(config, [1, 2], cfg=cfg)
    assert torch.equal(_run(config, [5, 7], cfg=cfg).tokens[1], alone)
    assert torch.equal(_run(config, [7, 1, 2], cfg=cfg).tokens[0], alone)
    assert torch.equal(_run(config, [7], cfg=cfg).tokens[0], alone)


@pytest.mark.parametrize("variant,steps,nfe", [
    ("masked", None, 3 * 5 + 1),     # every step but the last: 3T − 2
    ("masked", [0, 2], 6 + 2 * 2),
    ("masked", [0, 1, 2, 3, 4, 5], 3 * 6),
    ("random", None, 2 * 5 + 1),     # no inversion pass
    ("recover", [1], 6 + 1),
])
def test_zsampling_nfe(variant, steps, nfe):
    calls = []
    config = _config(zsampling={"variant": variant, "inversion_cfg": 0.25, "steps": steps})
    result = _run(config, [0, 1], cfg=3.0, calls=calls)
    assert result.nfe == nfe == len(calls)
    n_z = 5 if steps is None else len(steps)
    assert calls.count(0.25) == (n_z if variant == "masked" else 0)  # inversion passes use the inversion CFG
    assert not (result.tokens == MASK).any()


def test_inversion_remasks_back_to_step_i():
    before = torch.tensor([[MASK, MASK, MASK, MASK, 3, 5], [MASK, MASK, 1, 2, 3, 4]])
    after = torch.tensor([[MASK, 7, 8, MASK, 3, 5], [MASK, 0, 1, 2, 3, 4]])
    logits = torch.zeros(2, 6, V)
    # confidence of the current token at each position: row 0 lowest at positions 4 and 1
    conf = torch.tensor([[0.0, 1.0, 5.0, 0.0, -2.0, 3.0], [0.0, 9.0, 2.0, -1.0, 4.0, 4.0]])
    logits.scatter_(-1, after.clamp(max=V - 1)[..., None], conf[..., None])
    masked = invert_by_remasking(before, after, MASK, "masked", _gens([0, 1]), logits)
    assert (masked == MASK).sum(-1).tolist() == (before == MASK).sum(-1).tolist()
    assert masked[0].tolist() == [MASK, MASK, 8, MASK, MASK, 5]  # re-masked: the 2 least confident decoded
    assert masked[1].tolist() == [MASK, 0, 1, MASK, 3, 4]        # an older token (pos 3) can be re-masked
    assert torch.equal(invert_by_remasking(before, after, MASK, "recover", _gens([0, 1])), before)
    rand = invert_by_remasking(before, after, MASK, "random", _gens([0, 1]))
    assert (rand == MASK).sum(-1).tolist() == [4, 2]
    assert ((rand == after) | (rand == MASK)).all() and (rand[after == MASK] == MASK).all()


def test_official_remask_takes_the_highest_max_probability_tokens():
    before = torch.tensor([[MASK, MASK, MASK, MASK, 3, 5]])
    after = torch.tensor([[MASK, 7, 8, MASK, 3, 5]])
    logits = torch.zeros(1, 6, V)
    logits[0, :, 0] = torch.tensor([9.0, 1.0, 4.0, 9.0, 2.0, 3.0])
    logits[0, [1, 2, 4, 5], [7, 8, 3, 5]] = torch.tensor([-3.0, 6.0, -3.0, 6.0])  # the decoded tokens' own logits
    # official: the highest max_v p(v) go back under the mask, i.e. the two confident positions 2 and 5
    official = invert_by_remasking(before, after, MASK, "masked", _gens([0]), logits, remask="official")
    assert official[0].tolist() == [MASK, 7, MASK, MASK, 3, MASK]
    # paper: the lowest p of the decoded token, positions 1 and 4
    paper = invert_by_remasking(before, after, MASK, "masked", _gens([0]), logits, remask="paper")
    assert paper[0].tolist() == [MASK, MASK, 8, MASK, MASK, 5]
    with pytest.raises(ValueError, match="remask"):
        SamplerConfig.from_dict({"zsampling": {"variant": "random", "remask": "official"}})
    result = _run(_config(zsampling={"variant": "masked", "remask": "official"}), [0, 1], cfg=3.0)
    assert result.nfe == 3 * 5 + 1 and not (result.tokens == MASK).any()


@pytest.mark.parametrize("inversion_cfg", [-1.0, -0.5, 2.5])
def test_inversion_cfg_may_be_negative_and_is_passed_literally(inversion_cfg):
    calls = []
    config = _config(zsampling={"variant": "masked", "inversion_cfg": inversion_cfg, "steps": [0, 1]})
    assert config.needs_unconditional
    result = _run(config, [0, 1, 2, 3], cfg=1.0, calls=calls)
    assert calls.count(inversion_cfg) == 2 and result.nfe == 6 + 2 * 2
    other = _run(config.with_overrides({"zsampling.inversion_cfg": 0.0}), [0, 1, 2, 3], cfg=1.0)
    assert not torch.equal(result.tokens, other.tokens)


def test_masked_zsampling_needs_a_guidance_scale_parameter():
    def plain(tokens, timestep):
        return torch.zeros(tokens.shape[0], V, *tokens.shape[1:])

    with pytest.raises(TypeError, match="guidance_scale"):
        sample(plain, 1, GRID, MASK, _config(zsampling={"variant": "masked"}), _gens([0]), progress=False)
    sample(plain, 1, GRID, MASK, _config(zsampling={"variant": "random"}), _gens([0]), progress=False)


def test_momentum_coefficient_and_projection():
    config = _config(num_steps=10, schedule="root", rho=0.6)
    coefs = [momentum_coefficient(config, i) for i in range(10)]
    assert coefs[0] == 0 and coefs[1] == 0  # no previous step / σ_{s'} = 1 (λ = −inf)
    assert coefs[-1] == 0                    # σ_t = 0 at the last step: first order
    assert all(math.isfinite(c) and c > 0 for c in coefs[2:-1])
    assert second_order_coefficient(0.8, 0.5, 0.2) == pytest.approx(
        (math.log(4) - 0) / (2 * (0 - math.log(0.25))))
    gen = torch.Generator().manual_seed(0)
    p, q = torch.rand(2, 2, 8, 5, generator=gen).softmax(-1)
    d = second_order_probs(p, q, 3.0)
    assert (d >= 0).all() and torch.allclose(d.sum(-1), torch.ones(2, 8))
    assert torch.equal(second_order_probs(p, q, 0.0), p)


@pytest.mark.parametrize("schedule,rho", [("cosine", 1.0), ("linear", 1.0), ("pow", 0.6), ("pow", 2.0),
                                         ("root", 0.6), ("root", 2.0)])
@pytest.mark.parametrize("steps", [8, 12, 16, 32])
def test_momentum_last_step_is_first_order_for_every_schedule(schedule, rho, steps):
    # cos(π/2) is 6e−17 in floating point: σ(1) must still be exactly 0, or the last step's
    # 2nd-order coefficient is about 20 instead of a first-order fallback
    assert mask_ratio(schedule, 1.0, rho) == 0.0 and mask_ratio(schedule, 0.0, rho) == 1.0
    assert float(mask_ratio(schedule, torch.tensor([0.0, 1.0], dtype=torch.float64), rho)[-1]) == 0.0
    config = _config(num_steps=steps, schedule=schedule, rho=rho)
    coefs = [momentum_coefficient(config, i) for i in range(steps)]
    assert coefs[0] == 0.0 and coefs[-1] == 0.0
    assert all(math.isfinite(c) and 0.0 <= c < 5.0 for c in coefs)
    assert any(c > 0 for c in coefs[1:-1])


@pytest.mark.parametrize("name", ["momentum2", "differential", "noise", "zsampling_masked", "zsampling_random",
                                  "paper-combo", "everything"])
def test_token_bookkeeping_follows_the_schedule(name):
    """Never more tokens decoded than the schedule allows; without Z-steps decoded tokens stay."""
    config = _trick_config(name, num_steps=8)
    history = []
    _run(config, [0, 1, 2], cfg=3.0, callback=lambda step, t: history.append(t.clone().flatten(1)))
    prev = torch.full((3, N), MASK)
    rewrites = config.zsampling.variant in ("masked", "random")
    for step, tokens in enumerate(history):
        masked, prev_masked = (tokens == MASK).sum(-1), (prev == MASK).sum(-1)
        if step == config.num_steps - 1:
            assert (masked == 0).all()
        else:
            target = math.floor(N * mask_ratio(config.schedule, (step + 1) / config.num_steps, config.rho))
            assert torch.equal(masked, torch.clamp(torch.minimum(prev_masked - 1, torch.tensor(target)), min=1))
        if not rewrites:
            decoded = prev != MASK
            assert torch.equal(tokens[decoded], prev[decoded])
        assert ((tokens == MASK) | (tokens < V)).all()
        prev = tokens


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("name", ["noise", "differential", "zsampling_masked", "momentum2", "paper-combo"])
def test_batches_with_and_without_cfg(name, cfg, batch):
    result = _run(_trick_config(name), list(range(batch)), cfg=cfg)
    assert result.tokens.shape == (batch, *GRID)
    assert not (result.tokens == MASK).any() and (result.tokens < V).all()


def test_pipeline_paper_combo_batch_cfg_nfe_and_independence(random_pipeline):
    config = SamplerConfig.preset("paper-combo", base=random_pipeline.settings.sampler, num_steps=4)
    prompts = ["a red circle", "two blue squares"]
    out = random_pipeline(prompts, seed=5, sampler=config, progress=False, output_type="tokens")
    assert out.nfe == 3 * 4 - 2 and out.tokens.shape == (2, 16, 16)
    assert out.tokens.max() < random_pipeline.transformer.config.codebook_size
    alone = random_pipeline(prompts[1:], seed=6, sampler=config, progress=False, output_type="tokens")
    assert torch.equal(out.tokens[1], alone.tokens[0])


def test_pipeline_inversion_cfg_without_main_cfg(random_pipeline):
    # CFG off for sampling, but the inversion pass is unconditional: the pipeline must encode negatives
    config = random_pipeline.settings.sampler.replace(num_steps=3, guidance_scale=1.0,
                                                       zsampling={"variant": "masked", "inversion_cfg": 0.0})
    out = random_pipeline("a red circle", seed=0, sampler=config, progress=False)
    assert out.nfe == 3 * 3 - 2 and len(out.images) == 1
    vanilla = random_pipeline("a red circle", seed=0, sampler=config.replace(zsampling={}), progress=False)
    assert vanilla.nfe == 3


def test_cli_flags_map_onto_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    base = _config(num_steps=20, guidance_scale=5.0)
    assert sampler_config_from_args(parser.parse_args([]), base) == base
    args = parser.parse_args(["--sampler", "paper-combo", "--noise-scale", "2", "--diff-z", "50", "--momentum", "2",
                              "--zsampling-steps", "0:4", "--inversion-cfg", "1.5", "--rho", "0.5",
                              "--gumbel-temperature", "1", "0.25", "--diff-resample", "clipped",
                              "--zsampling-remask", "official"])
    config = sampler_config_from_args(args, base)
    assert (config.num_steps, config.guidance_scale, config.timestep_convention) == (20, 5.0, "mask_ratio")
    assert config.noise == type(config.noise)(curve="abs_cos", scale=2.0)
    assert config.differential.percent == 50 and config.momentum.order == 2 and config.rho == 0.5
    assert config.gumbel_temperature == (1.0, 0.25)
    assert config.zsampling.steps == (0, 1, 2, 3) and config.zsampling.inversion_cfg == 1.5
    assert config.differential.resample == "clipped" and config.zsampling.remask == "official"
    assert config.schedule == "cosine" and config.zsampling.variant == "masked"  # from paper-combo
    path = tmp_path / "sweep.yaml"
    path.write_text("schedule: linear\nzsampling: {variant: recover, steps: [1, 2]}\n")
    config = sampler_config_from_args(parser.parse_args(["--sampler-config", str(path), "--zsampling-steps", "all"]),
                                      base)
    assert config.schedule == "linear" and config.zsampling.variant == "recover" and config.zsampling.steps is None


def _random_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(V, 64, generator=gen)

    def model_fn(tokens, timestep):  # logits depend on the tokens, like a real model
        b, h, w = tokens.shape
        feats = tokens.clamp(max=V - 1).float().mean(dim=(1, 2), keepdim=True) / V + timestep[:, None, None]
        return (table[:, : h * w].reshape(1, V, h, w) * feats[:, None]).expand(b, V, h, w)

    return model_fn


def test_masked_count_follows_schedule_and_decoded_tokens_stay():
    config = SamplerConfig(num_steps=10, guidance_scale=1.0, timestep_convention="mask_ratio")
    n = 64
    history = []
    sample(_random_model(), 3, (8, 8), MASK, config, [torch.Generator().manual_seed(s) for s in range(3)],
           progress=False, callback=lambda step, t: history.append(t.clone().flatten(1)))
    prev = torch.full((3, n), MASK)
    for step, tokens in enumerate(history):
        masked = (tokens == MASK).sum(-1)
        prev_masked = (prev == MASK).sum(-1)
        if step == config.num_steps - 1:
            assert (masked == 0).all()
        else:
            target = math.floor(n * mask_ratio("cosine", (step + 1) / config.num_steps))
            expected = torch.clamp(torch.minimum(prev_masked - 1, torch.tensor(target)), min=1)
            assert torch.equal(masked, expected)
        decoded_before = prev != MASK
        assert torch.equal(tokens[decoded_before], prev[decoded_before])  # never re-masked or changed
        assert ((tokens == MASK) | (tokens < V)).all()
        prev = tokens


def test_same_seed_same_tokens_whatever_the_batch():
    config = SamplerConfig(num_steps=6, guidance_scale=1.0, timestep_convention="mask_ratio")
    model = _random_model()

    def run(seeds):
        return sample(model, len(seeds), (4, 4), MASK, config, [torch.Generator().manual_seed(s) for s in seeds],
                      progress=False)

    alone = run([7])
    assert torch.equal(alone[0], run([7])[0])

    # a sample's tokens depend on its own generator only — a different batch neighbour changes nothing
    def model_rowwise(tokens, timestep):
        return torch.cat([model(tokens[i : i + 1], timestep[i : i + 1]) for i in range(tokens.shape[0])])

    a = sample(model_rowwise, 2, (4, 4), MASK, config, [torch.Generator().manual_seed(s) for s in (7, 8)], progress=False)
    b = sample(model_rowwise, 2, (4, 4), MASK, config, [torch.Generator().manual_seed(s) for s in (3, 7)], progress=False)
    assert torch.equal(a[0], b[1])
    assert not torch.equal(run([8])[0], alone[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_classifier_free_guidance_rounds_as_the_expression_and_keeps_its_inputs_and_layout(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 64, 6, 6, generator=g) * 8).to(dtype).contiguous(memory_format=torch.channels_last)
    before = logits.clone()
    uncond, cond = logits.chunk(2)
    guided = maskgit.classifier_free_guidance(uncond, cond, 9.0)
    u, c = uncond.float(), cond.float()
    assert guided.dtype == torch.float32 and torch.equal(guided, u + 9.0 * (c - u))
    assert torch.equal(logits, before)  # float32 logits are not guided in place
    assert guided.is_contiguous(memory_format=torch.channels_last)
