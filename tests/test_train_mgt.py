"""Training the default model: the masked-token objective, a few-step smoke run, resume."""

import math

import pytest
import torch

from mgtq.factory import tiny_vqmodel
from mgtq.pipeline import MGTPipeline
from mgtq.training.mgt import MGTTrainConfig, train_mgt
from mgtq.training.objective import mask_tokens, masked_token_loss

TINY = dict(dataset_size=32, batch_size=4, save_every=2, text_layers=1,
            transformer_overrides={"num_layers": 1, "num_single_layers": 1})


def test_mask_tokens_fraction_and_timestep():
    tokens = torch.randint(0, 10, (64, 4, 4))
    masked, mask, timestep = mask_tokens(tokens, 99, torch.Generator().manual_seed(0))
    assert torch.equal(mask.flatten(1).sum(1).float() / 16, timestep)
    assert (mask.flatten(1).sum(1) >= 1).all()
    assert torch.equal(masked[~mask], tokens[~mask]) and (masked[mask] == 99).all()
    # cosine-distributed ratio: mean of cos(πr/2) over U(0,1) is 2/π
    many = mask_tokens(torch.zeros(4000, 8, 8, dtype=torch.long), 1, torch.Generator().manual_seed(1))[2]
    assert abs(many.mean().item() - 2 / math.pi) < 0.03


def test_masked_token_loss_ignores_unmasked_positions():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 10.0  # confidently predicts class 1 everywhere
    targets = torch.tensor([[[1, 0], [0, 0]]])
    mask = torch.tensor([[[True, False], [False, False]]])
    assert masked_token_loss(logits, targets, mask).item() < 1e-3


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "vqvae"
    torch.manual_seed(0)
    tiny_vqmodel(64).save_pretrained(path)
    return path


def test_training_smoke_writes_a_loadable_pipeline(tmp_path, vq_dir):
    summary = train_mgt(vq_dir, tmp_path / "run", tmp_path / "out", MGTTrainConfig(steps=4, **TINY), progress=False)
    assert math.isfinite(summary["final_loss"])
    pipe = MGTPipeline.from_pretrained(tmp_path / "out")
    assert pipe.settings.sampler.timestep_convention == "mask_ratio"
    out = pipe("a red circle", seed=0, num_inference_steps=2, progress=False)
    assert out.tokens.shape == (1, 16, 16) and out.images[0].size == (64, 64)


def test_resume_continues_from_saved_step(tmp_path, vq_dir):
    run = tmp_path / "run"
    train_mgt(vq_dir, run, None, MGTTrainConfig(steps=2, **TINY), progress=False)
    with pytest.raises(ValueError, match="different config"):
        train_mgt(vq_dir, run, None, MGTTrainConfig(steps=2, lr=1e-2, **TINY), progress=False)
    from mgtq.utils import read_json

    assert read_json(run / "state" / "trainer.json")["step"] == 2
    # a finished run resumes to a no-op: no step is repeated
    summary = train_mgt(vq_dir, run, None, MGTTrainConfig(steps=2, **TINY), progress=False)
    assert summary["final_loss"] is None


def test_training_recipes_are_valid_configs_chained_by_init_from():
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "recipes" / "train"
    recipes = sorted(folder.rglob("*.json"))
    assert len(recipes) >= 4
    for path in recipes:
        MGTTrainConfig(**json.loads(path.read_text()))  # unknown keys or bad values raise
    stages = [json.loads((folder / f"tiny-shapes-mgt-stage{i}.json").read_text()) for i in (1, 2, 3, 4)]
    assert stages[0].get("init_from") is None
    assert [s["init_from"] for s in stages[1:]] == [f"runs/tiny-shapes-stage{i}" for i in (1, 2, 3)]
