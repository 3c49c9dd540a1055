"""mgtq.training.mgt: warm starts across transformer layouts, a few-step training smoke run, resume, the
training recipes and category weights."""

import math
from pathlib import Path

import pytest
import torch

from mgtq.config import from_mapping
from mgtq.models.presets import preset_config
from mgtq.models.random import tiny_vqmodel
from mgtq.models.transformer import MeissonicTransformer
from mgtq.pipeline import MGTPipeline
from mgtq.training.mgt import MGTTrainConfig, _warm_start, build_models, train_mgt


SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-shapes"


def _fresh(preset: str, **overrides):
    source = MGTPipeline.from_pretrained(SHIPPED)
    return build_models(MGTTrainConfig(transformer_preset=preset, transformer_overrides=overrides), source.tokenizer,
                        codebook_size=256) + (source,)


def test_layout_without_compression_reuses_every_weight_but_the_compression_convs():
    transformer, text_encoder, source = _fresh("tiny-shapes-16x16")
    record = _warm_start(transformer, text_encoder, source.tokenizer, SHIPPED)
    target = transformer.state_dict()
    assert record["reused"] == len(target)
    assert record["dropped"] and all(k.startswith(("down_block.", "up_block.")) for k in record["dropped"])
    shipped = source.transformer.state_dict()
    assert all(torch.equal(target[k], shipped[k]) for k in target)
    assert all(torch.equal(v, source.text_encoder.state_dict()[k]) for k, v in text_encoder.state_dict().items())
    # and the warm-started model runs at 4x the tokens: the 16x16 VQ grid in every block
    tokens = torch.randint(0, 256, (1, 16, 16))
    seen = []
    transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[1].shape[1]))
    with torch.no_grad():
        transformer(hidden_states=tokens, encoder_hidden_states=torch.zeros(1, 4, 128),
                    pooled_projections=torch.zeros(1, 128), timestep=torch.ones(1), micro_conds=torch.zeros(1, 5))
    assert seen == [256]


def test_warm_start_refuses_other_shapes():
    _, text_encoder, source = _fresh("tiny-shapes")
    bigger = MeissonicTransformer(**preset_config("tiny-shapes", joint_attention_dim=64))
    with pytest.raises(ValueError, match="other shapes"):
        _warm_start(bigger, text_encoder, source.tokenizer, SHIPPED)


def test_elapsed_time_carries_over_a_resume(tmp_path):
    from mgtq.training.mgt import _elapsed_before

    log = tmp_path / "log.jsonl"
    assert _elapsed_before(log, 500) == 0.0
    log.write_text('{"step": 250, "loss": 2.0, "elapsed_s": 300.0}\n{"step": 500, "loss": 1.9, "elapsed_s": 610.5}\n'
                   '{"step": 750, "loss": 1.8, "elapsed_s": 905.0}\n')
    assert _elapsed_before(log, 0) == 0.0  # a fresh start
    assert _elapsed_before(log, 500) == 610.5  # resumed from the step-500 state: the later line is not counted
    assert _elapsed_before(log, 750) == 905.0


TINY = dict(dataset_size=32, batch_size=4, save_every=2, text_layers=1,
            transformer_overrides={"num_layers": 1, "num_single_layers": 1})


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
    from mgtq.files import read_json

    assert read_json(run / "state" / "trainer.json")["step"] == 2
    # a finished run resumes to a no-op: no step is repeated, and its summary is the same
    log = (run / "log.jsonl").read_text()
    torch.manual_seed(5)
    stream = torch.get_rng_state()
    again = train_mgt(vq_dir, run, None, MGTTrainConfig(steps=2, **TINY), progress=False)
    assert (run / "log.jsonl").read_text() == log
    assert again == first
    assert torch.equal(torch.get_rng_state(), stream)  # seeded and resumed for its run only, not the caller's


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
    from mgtq.files import read_json

    config = MGTTrainConfig(steps=1, category_weights={"counting": 1}, **TINY)
    train_mgt(vq_dir, tmp_path / "run", None, config, progress=False)
    assert read_json(tmp_path / "run" / "data.json")["category_weights"] == {"counting": 1}
    from datasets import load_from_disk

    captions = load_from_disk(str(tmp_path / "run" / "data"))["caption"]
    assert all(c.startswith(("two ", "three ")) for c in captions)
