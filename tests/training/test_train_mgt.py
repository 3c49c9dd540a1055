"""Training the default model: the masked-token objective, a few-step smoke run, resume."""

import math

import pytest
import torch

from mgtq.config import from_mapping
from mgtq.models.random import tiny_vqmodel
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
    first = train_mgt(vq_dir, run, None, MGTTrainConfig(steps=2, **TINY), progress=False)
    with pytest.raises(ValueError, match="different config"):
        train_mgt(vq_dir, run, None, MGTTrainConfig(steps=2, lr=1e-2, **TINY), progress=False)
    from mgtq.utils import read_json

    assert read_json(run / "state" / "trainer.json")["step"] == 2
    # a finished run resumes to a no-op: no step is repeated, and its summary is the same
    log = (run / "log.jsonl").read_text()
    again = train_mgt(vq_dir, run, None, MGTTrainConfig(steps=2, **TINY), progress=False)
    assert (run / "log.jsonl").read_text() == log
    assert again == first


def test_training_recipes_are_valid_configs_and_the_default_trains_from_scratch():
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "recipes" / "train"
    recipes = sorted(folder.rglob("*.json"))
    assert len(recipes) >= 4
    for path in recipes:
        from_mapping(MGTTrainConfig, json.loads(path.read_text()), path.name)  # unknown keys or bad values raise
    # the shipped model is one schedule from scratch: nothing outside the VQ may feed into it
    assert json.loads((folder / "tiny-shapes-mgt.json").read_text()).get("init_from") is None
    # the earlier four-stage chain, kept as history, still chains by init_from
    n = len(list((folder / "history").glob("tiny-shapes-mgt-stage*.json")))
    assert n == 4
    stages = [json.loads((folder / "history" / f"tiny-shapes-mgt-stage{i}.json").read_text())
              for i in range(1, n + 1)]
    assert stages[0].get("init_from") is None
    assert [s["init_from"] for s in stages[1:]] == [f"runs/tiny-shapes-stage{i}" for i in range(1, n)]


def test_unweighted_training_scenes_are_the_worlds_own_draws():
    from mgtq.shapes.world import sample_scene
    from mgtq.training.mgt import training_scene

    # the shipped model and stages 1–4 were trained on these exact scenes; weights must not change them
    assert [training_scene(i, 2) for i in range(5)] == [sample_scene(3_000_000_000 + i) for i in range(5)]


def test_category_weights_set_the_training_mix():
    from collections import Counter

    from mgtq.training.mgt import training_scene

    weights = {"two_objects": 3, "colour": 1}
    counts = Counter(training_scene(i, 0, weights).spec.category for i in range(400))
    assert set(counts) == {"two_objects", "colour"}
    assert 0.65 < counts["two_objects"] / 400 < 0.85
    assert training_scene(7, 0, weights) == training_scene(7, 0, weights)  # deterministic


@pytest.mark.parametrize("weights, match", [({"triangles": 1}, "unknown categories"),
                                            ({"single": -1, "colour": 2}, "≥ 0"),
                                            ({"single": 0}, "not all 0")])
def test_bad_category_weights_are_rejected(weights, match):
    with pytest.raises(ValueError, match=match):
        MGTTrainConfig(category_weights=weights)


def test_weighted_data_is_cached_apart_from_unweighted(tmp_path, vq_dir):
    from mgtq.utils import read_json

    config = MGTTrainConfig(steps=1, category_weights={"counting": 1}, **TINY)
    train_mgt(vq_dir, tmp_path / "run", None, config, progress=False)
    assert read_json(tmp_path / "run" / "data.json")["category_weights"] == {"counting": 1}
    from datasets import load_from_disk

    captions = load_from_disk(str(tmp_path / "run" / "data"))["caption"]
    assert all(c.startswith(("two ", "three ")) for c in captions)
