"""mgtq.seeding: per-sample generators on the sampling device (the host for mps); derived seeds."""

import torch

from mgtq.seeding import derive_seed, generator_device, per_sample_generators


def test_generators_of_another_device_seed_generators_on_the_sampling_device(monkeypatch):
    """A CUDA generator draws its seeds on its own device (a CPU draw from it is an error), and generators on
    another device than the sampler's seed one each there, so no step samples on the host."""
    import mgtq.seeding

    made, draws = [], []
    monkeypatch.setattr(mgtq.seeding, "_generator_on", lambda device, seed: made.append((str(device), seed)) or seed)
    real_randint = torch.randint

    def randint(*args, generator=None, device=None, **kw):
        draws.append(device)
        return real_randint(*args, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "randint", randint)
    cpu = [torch.Generator().manual_seed(i) for i in (7, 8)]
    assert per_sample_generators(2, generator=cpu, device="cpu") == cpu and not made  # same device: as given
    seeds = per_sample_generators(2, generator=[torch.Generator().manual_seed(i) for i in (7, 8)], device="cuda")
    assert [d for d, _ in made] == ["cuda", "cuda"] and seeds == [s for _, s in made]
    assert seeds == per_sample_generators(2, generator=[torch.Generator().manual_seed(i) for i in (7, 8)],
                                          device="cuda:0")  # the same seeds: reproducible
    assert len(set(seeds)) == 2
    draws.clear()
    per_sample_generators(3, generator=torch.Generator().manual_seed(1), device="cuda")
    assert draws == [torch.device("cpu")] * 3  # on the generator's device, whatever the sampler's; one per seed
    # seed i is the same whatever the count (one draw each: a long draw need not begin with a short one's values)
    made.clear()
    per_sample_generators(2, generator=torch.Generator().manual_seed(1), device="cuda")
    two = [s for _, s in made]
    made.clear()
    per_sample_generators(5, generator=torch.Generator().manual_seed(1), device="cuda")
    assert [s for _, s in made][:2] == two


def test_a_model_on_mps_draws_from_host_generators():
    # MPS's multinomial has drawn ids outside the vocabulary and of zero probability: the draws stay on the host,
    # with the CPU's streams (the same noise as a CPU run of the same seeds)
    gens, ref = per_sample_generators(2, seed=5, device="mps"), per_sample_generators(2, seed=5, device="cpu")
    assert [g.device.type for g in gens] == ["cpu", "cpu"]
    assert all(torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b)) for a, b in zip(gens, ref))
    g = torch.Generator().manual_seed(3)
    assert per_sample_generators(1, generator=g, device="mps") == [g]  # a host generator is used as given
    assert generator_device("mps:0") == torch.device("cpu") and generator_device("cuda:1") == torch.device("cuda:1")


def test_derived_seeds():
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b")
    assert 0 <= derive_seed(2**70) < 2**63
