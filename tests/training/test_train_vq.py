"""mgtq.training.train_vq: the tiny VQ tokenizer's training helpers, a few-step training smoke test, resume, export."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mgtq.training.loop import warmup_cosine
from mgtq.training.train_vq import VQTrainConfig, reinit_codes, train_vq, vq_forward, world_batch
from mgtq.vq import (
    VQConfig,
    build_vq,
    config_of,
    decode_tokens,
    encode_to_tokens,
    images_to_tensor,
    load_vq,
    roundtrip,
    tensor_to_images,
)


TINY = VQConfig(block_out_channels=(8, 16, 16), latent_channels=4, num_vq_embeddings=32, norm_num_groups=4)
TRAIN = dict(batch_size=2, lr=1e-3, seed=0, model=TINY, warmup_steps=2, checkpoint_every=2, log_every=1,
             dead_code_every=2, progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="must divide"):
        VQConfig(block_out_channels=(16, 30), norm_num_groups=8)
    with pytest.raises(ValueError, match="not divisible"):
        VQConfig(image_size=66)
    with pytest.raises(ValueError, match="steps"):
        VQTrainConfig(steps=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        VQTrainConfig(mixed_precision="fp16")


def test_encode_decode_shapes_and_consistency():
    vq = build_vq(TINY).eval()
    images = world_batch(seed=0, step=0, batch_size=3)
    x = images_to_tensor(images)
    assert x.shape == (3, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    tokens = encode_to_tokens(vq, x)
    assert tokens.shape == (3, 16, 16) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < TINY.num_vq_embeddings
    out = decode_tokens(vq, tokens)
    assert out.shape == (3, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        recon, _, indices, _ = vq_forward(vq, x)
    assert torch.equal(indices.reshape(3, 16, 16), tokens)  # same quantization as training
    assert torch.allclose(recon.clamp(-1, 1), out, atol=1e-5)
    assert roundtrip(vq, images).shape == images.shape
    assert np.array_equal(tensor_to_images(x), images)
    with pytest.raises(ValueError, match="token ids"):
        decode_tokens(vq, torch.full((1, 16, 16), TINY.num_vq_embeddings))


def test_world_batch_is_a_pure_function_of_seed_and_step():
    a, b = world_batch(3, 7, 4), world_batch(3, 7, 4)
    assert a.shape == (4, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, world_batch(3, 8, 4))


def test_reinit_codes_replaces_only_the_given_rows_with_latents():
    emb = torch.zeros(8, 4)
    z = torch.randn(2, 4, 3, 3)
    reinit_codes(emb, torch.tensor([1, 5]), z, torch.Generator().manual_seed(0))
    assert emb[[0, 2, 3, 4, 6, 7]].abs().sum() == 0
    latents = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for row in emb[[1, 5]]:
        assert torch.cdist(row[None], latents).min() < 0.05  # a latent plus 1% noise


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_smoke_resume_and_export(tmp_path):
    # Uninterrupted 4-step run vs. a run interrupted after step 2 and resumed: identical weights.
    straight = train_vq(tmp_path / "a", steps=4, export_to=tmp_path / "export", **TRAIN)
    interrupted = train_vq(tmp_path / "b", steps=4, stop_after=2, **TRAIN)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "b" / "final").exists()
    assert not torch.equal(_params(interrupted), _params(straight))
    resumed = train_vq(tmp_path / "b", steps=4, **TRAIN)
    assert torch.allclose(_params(resumed), _params(straight), atol=1e-6)

    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # the learning rate after each step: the shared schedule's (warm-up, then cosine down to min_lr_ratio)
    assert [r["lr"] for r in log] == pytest.approx(
        [TRAIN["lr"] * warmup_cosine(r["step"], 4, TRAIN["warmup_steps"], VQTrainConfig.min_lr_ratio) for r in log])
    assert all(np.isfinite(r["loss"]) for r in log)

    for folder in (tmp_path / "a" / "final", tmp_path / "export"):
        assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = load_vq(str(tmp_path / "export"))
    assert loaded.config.lookup_from_codebook
    x = images_to_tensor(world_batch(1, 0, 2))
    assert torch.equal(encode_to_tokens(loaded, x), encode_to_tokens(straight.eval(), x))
    assert not list(tmp_path.rglob(".*"))  # atomic writes leave no temporaries or old copies


def test_a_checkpoint_whose_swap_was_killed_is_resumed_from(tmp_path):
    """A kill between the two renames of a save (where folders cannot be exchanged in one step) leaves only the
    hidden old copy; resuming puts it back instead of starting over."""
    straight = train_vq(tmp_path / "a", steps=4, **TRAIN)
    train_vq(tmp_path / "b", steps=4, stop_after=2, **TRAIN)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "b" / "checkpoint").rename(tmp_path / "b" / f".checkpoint.old-{dead.pid}-cccc0000")
    resumed = train_vq(tmp_path / "b", steps=4, **TRAIN)
    assert torch.allclose(_params(resumed), _params(straight), atol=1e-6)
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_no_resume_starts_over(tmp_path):
    train_vq(tmp_path, steps=2, **TRAIN)
    fresh = train_vq(tmp_path, steps=2, resume=False, **TRAIN)
    again = train_vq(tmp_path / "other", steps=2, **TRAIN)
    assert torch.allclose(_params(fresh), _params(again), atol=1e-6)


SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-shapes" / "vqvae"


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="trained VQ not in this checkout")
def test_shipped_vq_round_trip_keeps_shapebench_accuracy():
    from mgtq.training.train_vq import evaluate_roundtrip

    vq = load_vq(str(SHIPPED))
    assert config_of(vq) == VQConfig()  # the default architecture is the shipped one
    result = evaluate_roundtrip(vq, per_category=8)
    assert result["overall"] >= 0.95 and result["ground_truth_overall"] == 1.0
