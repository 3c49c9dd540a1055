"""The vanilla MaskGIT sampler: schedule bookkeeping, decoded tokens stay, determinism per sample."""

import math

import pytest
import torch

from mgtq.sampling import SamplerConfig, mask_ratio, sample
from mgtq.sampling.maskgit import remask_lowest

MASK = 99
V = 16


def _random_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(V, 64, generator=gen)

    def model_fn(tokens, timestep):  # logits depend on the tokens, like a real model
        b, h, w = tokens.shape
        feats = tokens.clamp(max=V - 1).float().mean(dim=(1, 2), keepdim=True) / V + timestep[:, None, None]
        return (table[:, : h * w].reshape(1, V, h, w) * feats[:, None]).expand(b, V, h, w)

    return model_fn


@pytest.mark.parametrize("schedule", ["cosine", "linear", "pow", "root"])
def test_schedules_monotone_with_endpoints(schedule):
    ts = torch.linspace(0, 1, 101)
    values = mask_ratio(schedule, ts, rho=0.6)
    assert math.isclose(float(values[0]), 1.0, abs_tol=1e-9) and math.isclose(float(values[-1]), 0.0, abs_tol=1e-9)
    assert (values[1:] <= values[:-1] + 1e-12).all()


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


def test_gumbel_noise_is_finite():
    from mgtq.sampling.maskgit import gumbel_noise

    noise = gumbel_noise((10000,), torch.Generator().manual_seed(0), "cpu")
    assert torch.isfinite(noise).all() and abs(noise.mean().item() - 0.5772) < 0.05  # Euler–Mascheroni


def test_remask_lowest_picks_exactly_n():
    conf = torch.tensor([[0.5, 0.1, 0.9, 0.3], [1.0, 2.0, 3.0, 4.0]])
    mask = remask_lowest(conf, torch.tensor([2, 1]))
    assert mask.tolist() == [[False, True, False, True], [True, False, False, False]]


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        SamplerConfig(schedule="square")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="unknown key 'steps'"):
        SamplerConfig.from_dict({"steps": 3})
