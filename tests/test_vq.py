"""mgtq.vq: the default VQ architecture and its seeded builder."""

import torch

from mgtq.vq import VQConfig, build_vq, config_of

# The small architecture of the VQ training tests (tests/training/test_train_vq.py).
TINY = VQConfig(block_out_channels=(8, 16, 16), latent_channels=4, num_vq_embeddings=32, norm_num_groups=4)


def test_default_config_maps_64px_to_16x16_tokens():
    cfg = VQConfig()
    assert cfg.downsample_factor == 4 and cfg.token_grid == 16 and cfg.num_vq_embeddings == 256


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a, b, c = build_vq(TINY, seed=1), build_vq(TINY, seed=1), build_vq(TINY, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert config_of(a) == TINY
