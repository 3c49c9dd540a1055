"""Sizes and scales have documented upper bounds (mgtq.limits), no step allocates with num_steps, and
non-finite logits are caught before sampling with the setting that caused them."""

import random

import pytest
import torch

from mgtq import limits
from mgtq.cli import main
from mgtq.sampling import SamplerConfig, sample
from mgtq.sampling import maskgit
from mgtq.scq.recipe import recipe_from_dict

MASK = 7


def _model(value=0.0, where=None):
    """model_fn → logits (B, V=8, H, W): zeros, or `value` at one place."""
    def model_fn(tokens, timestep, guidance_scale=None):
        logits = torch.zeros(tokens.shape[0], MASK + 1, *tokens.shape[1:])
        logits[:, 0] = torch.arange(tokens[0].numel()).view(tokens.shape[1:]) * 0.01
        if where is not None:
            logits[(slice(None), *where)] = value
        return logits
    return model_fn


def _gens(n=1):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def test_gumbel_temperature_is_torch_linspace_bit_for_bit_without_building_it(monkeypatch):
    rng = random.Random(0)
    cases = [(t, 2.0, 0.0) for t in (1, 2, 3, 16, 48)] + [(t, rng.uniform(0, 5), rng.uniform(0, 5))
                                                          for t in list(range(2, 40)) + [97, 1000] for _ in range(3)]
    expected = {c: torch.linspace(c[1], c[2], c[0], dtype=torch.float64).tolist() for c in cases}
    monkeypatch.setattr(torch, "linspace", None)  # a per-step table of num_steps values is what grew memory
    for (steps, start, end), table in expected.items():
        config = SamplerConfig(num_steps=steps, gumbel_temperature=(start, end))
        assert [maskgit.gumbel_temperature(config, i) for i in range(steps)] == table


@pytest.mark.parametrize("changes,match", [
    ({"num_steps": 1_000_000_000}, r"num_steps must be an integer in \[1, 4096\]"),
    ({"guidance_scale": 1e308}, r"guidance_scale must be in \[0, 100\]"),
    ({"noise": {"curve": "abs_cos", "scale": 1e308}}, r"noise.scale must be in \[0, 100\]"),
    ({"zsampling": {"variant": "masked", "inversion_cfg": -1e308}}, r"inversion_cfg must be in \[-100, 100\]"),
])
def test_sampler_settings_beyond_their_limits_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig.from_dict(changes)


@pytest.mark.parametrize("flags,match", [
    (["--steps", "1000000000"], "--steps: must be an integer in [1, 4096]"),
    (["--cfg", "1e308"], "--cfg: must be a finite number in [0, 100]"),
    (["--noise-scale", "1e308"], "--noise-scale: must be a finite number in [0, 100]"),
    (["--height", "1000000000"], "--height: must be an integer in [1, 4096]"),
    (["--num-images", "100000000"], "--num-images: must be an integer in [1, 1024]"),
])
def test_the_cli_refuses_sizes_and_scales_beyond_their_limits_at_once(flags, match, tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "x.png"), *flags]) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("section,match", [
    ({"prompts": {"count": 10**12}}, r"prompts.count must be ≤ 100000"),
    ({"synthesis": {"resolution": 10**9}}, r"synthesis.resolution must be ≤ 4096"),
    ({"synthesis": {"num_steps": 10**9}}, r"synthesis.num_steps must be ≤ 4096"),
])
def test_a_recipe_beyond_the_limits_is_refused_when_read(section, match):
    with pytest.raises(ValueError, match=match):
        recipe_from_dict(section)


def test_limits_in_the_help_are_the_enforced_ones(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"at most {limits.MAX_STEPS}" in text and f"at most {limits.MAX_GUIDANCE:g}" in text
    assert f"at most {limits.MAX_RESOLUTION}" in text and f"at most {limits.MAX_IMAGES}" in text


@pytest.mark.parametrize("config,match", [
    (SamplerConfig(num_steps=4, guidance_scale=3.0), r"step 0 are not finite: guidance_scale 3 is too large"),
    (SamplerConfig(num_steps=4, guidance_scale=1.0, noise={"curve": "constant", "scale": 100.0}),
     r"step 0 are not finite: noise.scale 100 is too large"),
])
def test_non_finite_logits_are_caught_before_sampling_naming_the_setting(config, match):
    for bad in (float("inf"), -float("inf"), float("nan")):  # what an overflowing s(ℓc − ℓu) or α·ε gives
        model_fn = _model(bad, where=(0, 0, 0))
        with pytest.raises(FloatingPointError, match=match):
            sample(model_fn, 1, (2, 2), MASK, config, _gens(), progress=False)


def test_finite_logits_sample_as_before():
    tokens = sample(_model(), 2, (2, 2), MASK, SamplerConfig(num_steps=4, guidance_scale=1.0), _gens(2),
                    progress=False)
    assert tokens.shape == (2, 2, 2) and bool((tokens != MASK).all())
