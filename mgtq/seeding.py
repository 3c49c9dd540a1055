"""Random numbers mgtq can reproduce: one torch.Generator per sample, so a sample draws the same numbers
whatever shares its batch and whichever device the generators were made on (`per_sample_generators`), and
stable seeds derived from a base seed and names or indices (`derive_seed`), one per step, layer, block or
process."""

from __future__ import annotations

import hashlib

import torch


def per_sample_generators(
    batch_size: int,
    seed: int | list[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device = "cpu",
) -> list[torch.Generator]:
    """One torch.Generator per sample, so each sample draws the same random numbers whatever shares its batch.

    seed s → generators seeded s, s+1, …; a list of seeds, or of generators on `device`, is used as given; a single
    generator on `device` is the first sample's, as in a list of one (diffusers' `generator=g` and `[g]` are the
    same image, and so are `G(s)` and `seed=s`), and the others' seeds are drawn from a copy of its state, so
    sample i draws the same numbers whatever the batch size. A generator on another device draws one seed per
    sample, and so does each generator of a list on another device (diffusers' `[torch.Generator("cpu")
    .manual_seed(i) …]` for a CUDA pipeline): the sampler draws from them every step, which on the CPU would mean
    copying each step's probabilities to the host; nothing → seed 0. For a model on Apple's `mps` the generators are
    the host's (:func:`generator_device`).
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    device = generator_device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} samples")
        wrong = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if wrong:
            raise TypeError(f"generator must be a torch.Generator or a list of them, got a list holding {wrong[0]}; "
                            "pass integer seeds as seed=")
        if all(_same_device(g.device, torch.device(device)) for g in generator):
            return list(generator)
        return [_generator_on(device, _draw_seeds(g, 1)[0]) for g in generator]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}; "
                        "pass integer seeds as seed=")
    if isinstance(generator, torch.Generator):
        if _same_device(generator.device, torch.device(device)):
            copy = torch.Generator(device=generator.device).set_state(generator.get_state())
            return [generator] + [_generator_on(device, s) for s in _draw_seeds(copy, batch_size)[1:]]
        seeds = _draw_seeds(generator, batch_size)
    elif isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"got {len(seed)} seeds for {batch_size} samples")
        seeds = list(seed)
    else:
        base = 0 if seed is None else int(seed)
        seeds = [base + i for i in range(batch_size)]
    return [_generator_on(device, s) for s in seeds]


def _draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """`count` seeds drawn from `generator`, on its own device (a CUDA generator cannot draw a CPU tensor), one
    draw each: seed i is then the same whatever the count (one draw of `count` values need not begin with the
    values of a shorter one: CUDA's Philox spreads a long draw over threads)."""
    draws = [torch.randint(0, 2**62, (1,), generator=generator, device=generator.device) for _ in range(count)]
    return torch.cat(draws).tolist() if draws else []


def generator_device(device: str | torch.device) -> torch.device:
    """Where the sampler's generators live for a model on `device`: there, but on the host for Apple's `mps`, whose
    `torch.multinomial` has drawn ids outside the vocabulary (pytorch/pytorch#136623, fixed in Dec 2025) and ids of
    zero probability (#192577, seen on torch 2.13): a masked-out or the mask token drawn would be a wrong image, not
    an error. The draws' results move to the device; only the probabilities cross to the host, once a step."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def _generator_on(device: str | torch.device, seed: int) -> torch.Generator:
    """A generator on the device the sampler runs on: drawing there keeps the noise and the sampling on it."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 alike (an index left out is the current device)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings (SplitMix64-style avalanche over a stable hash).

    Stable across processes and Python versions (unlike `hash()`), and nearby inputs give unrelated
    seeds, so one base seed can be split per step, layer, block or process.
    """
    h = 0x9E3779B97F4A7C15
    for part in parts:
        if isinstance(part, str):
            part = int.from_bytes(hashlib.sha256(part.encode()).digest()[:8], "little")
        elif isinstance(part, bool) or not isinstance(part, int):
            raise TypeError(f"derive_seed takes ints and strings, got {type(part).__name__}")
        h = ((h ^ (part & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1
