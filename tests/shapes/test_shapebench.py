"""ShapeBench prompts and the pixel-only scorer."""

import dataclasses
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

import mgtq

from mgtq.shapes.shapebench import ShapeBenchPrompt, shapebench_scene, render_ground_truth, shapebench_prompts
from mgtq.shapes.scorer import (
    ScorerConfig,
    connected_components,
    detect_objects,
    evaluate,
    score_image,
)
from mgtq.shapes.world import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    ObjectSpec,
    PlacedShape,
    Scene,
    Spec,
    caption,
    render,
    shape_mask,
)


@pytest.fixture(scope="module")
def bench():
    items = shapebench_prompts()
    return items, render_ground_truth(items)


def test_prompt_set_is_fixed_balanced_and_large(bench):
    items, _ = bench
    assert len(items) >= 300
    assert shapebench_prompts() == items  # deterministic
    counts = Counter(i.category for i in items)
    assert set(counts) == set(CATEGORIES) and len(set(counts.values())) == 1
    assert len({i.seed for i in items}) == len(items)
    for item in items:
        assert caption(shapebench_scene(item)) == item.prompt


def test_prefix_stability():
    # prompt i of a category does not depend on how many prompts a category has
    small = shapebench_prompts(per_category=5)
    big = shapebench_prompts(per_category=64)
    for k, category in enumerate(CATEGORIES):
        assert small[5 * k : 5 * k + 5] == big[64 * k : 64 * k + 5]
    # start: a later stretch of each category, drawn as the first one is (a fresh draw for a confirmation)
    later = shapebench_prompts(per_category=4, split="val", start=60)
    val = shapebench_prompts(per_category=64, split="val")
    for k, category in enumerate(CATEGORIES):
        assert later[4 * k : 4 * k + 4] == val[64 * k + 60 : 64 * k + 64]
    for bad in ({"start": -1}, {"start": 50_000}, {"per_category": 0}):
        with pytest.raises(ValueError, match="must end within the split"):
            shapebench_prompts(**{"per_category": 1, **bad})


def test_val_split_is_disjoint_from_test_and_same_in_kind(bench):
    items, _ = bench
    val = shapebench_prompts(split="val")
    assert len(val) == len(items) and not {i.seed for i in val} & {i.seed for i in items}
    assert Counter(i.category for i in val) == Counter(i.category for i in items)
    assert [i.prompt for i in val] != [i.prompt for i in items]
    for item in val[::37]:
        assert caption(shapebench_scene(item)) == item.prompt
    with pytest.raises(ValueError, match="split"):
        shapebench_prompts(split="train")


def test_ground_truth_accuracy(bench):
    items, images = bench
    result = evaluate(list(images), items)
    assert result["n"] == len(items)
    assert result["overall"] >= 0.98
    assert set(result["per_category"]) == set(CATEGORIES)
    assert min(result["per_category"].values()) >= 0.95
    row = result["per_prompt"][0]
    assert {"prompt", "category", "seed", "ok", "reason", "detections"} <= set(row)


def test_accepts_pil_and_float_images(bench):
    items, images = bench
    assert score_image(Image.fromarray(images[0]), items[0].prompt)[0]
    assert score_image(images[1].astype(np.float32) / 255.0, items[1].prompt)[0]
    big = Image.fromarray(images[2]).resize((128, 128), Image.NEAREST)
    assert score_image(big, items[2].prompt)[0]


@pytest.mark.parametrize("sigma", [10.0])
def test_robust_to_gaussian_noise(bench, sigma):
    items, images = bench
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
    assert evaluate(list(noisy), items)["overall"] >= 0.98


@pytest.mark.parametrize("radius", [0.8])
def test_robust_to_blur(bench, radius):
    items, images = bench
    blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images]
    assert evaluate(blurred, items)["overall"] >= 0.98


# ---- wrong images must be rejected ------------------------------------------------------------


def _other(options, *avoid):
    return next(o for o in options if o not in avoid)


def _restyled(scene: Scene, colour=None, shape=None) -> tuple[Scene, str]:
    """Scene with object 0 recoloured / reshaped (layout kept), and the ORIGINAL prompt."""
    objs = list(scene.spec.objects)
    shapes = list(scene.shapes)
    n = len(objs) if scene.spec.category == "counting" else 1  # counting objects change together
    for i in range(n):
        objs[i] = ObjectSpec(colour or objs[i].colour, shape or objs[i].shape)
        shapes[i] = replace(shapes[i], colour=colour or shapes[i].colour, shape=shape or shapes[i].shape)
    return Scene(replace(scene.spec, objects=tuple(objs)), tuple(shapes)), caption(scene)


def _subset(items, per_category=12):
    return [i for i in items if i.seed % 100_000 < per_category]


def test_wrong_colour_is_rejected(bench):
    items, _ = bench
    for item in _subset(items):
        scene = shapebench_scene(item)
        colour = _other(COLOURS, *(o.colour for o in scene.spec.objects))
        wrong, prompt = _restyled(scene, colour=colour)
        ok, details = score_image(render(wrong), prompt)
        assert not ok, (prompt, details)


def test_wrong_shape_is_rejected(bench):
    items, _ = bench
    for item in _subset(items):
        scene = shapebench_scene(item)
        obj = scene.spec.objects[0]
        taken = {o.shape for o in scene.spec.objects if o.colour == obj.colour}
        shape = _other(SHAPES, *taken)
        wrong, prompt = _restyled(scene, shape=shape)
        ok, details = score_image(render(wrong), prompt)
        assert not ok, (prompt, details)


def _mirror_position(s: PlacedShape, axis: str) -> PlacedShape:
    if axis == "x":
        return replace(s, x0=IMAGE_SIZE - s.x0 - s.size)
    return replace(s, y0=IMAGE_SIZE - s.y0 - s.size)


def test_wrong_position_is_rejected(bench):
    items, _ = bench
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top",
                "left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
    checked = 0
    for item in items:
        scene = shapebench_scene(item)
        spec = scene.spec
        if spec.category == "position":
            axis = "x" if spec.region in ("left", "right") else "y"
            wrong = Scene(replace(spec, region=opposite[spec.region]), (_mirror_position(scene.shapes[0], axis),))
        elif spec.category == "two_objects":
            # Re-render with the relation reversed by mirroring the layout (shapes stay upright).
            axis = "x" if spec.relation in ("left_of", "right_of") else "y"
            wrong = Scene(replace(spec, relation=opposite[spec.relation]),
                          tuple(_mirror_position(s, axis) for s in scene.shapes))
        else:
            continue
        ok, details = score_image(render(wrong), caption(scene))
        assert not ok, (caption(scene), details)
        checked += 1
    assert checked == 128


def test_wrong_count_is_rejected(bench):
    items, images = bench
    for item, image in zip(items, images):
        if item.category != "counting":
            continue
        scene = shapebench_scene(item)
        fewer = image.copy()
        fewer[shape_mask(scene.shapes[-1])] = BACKGROUND  # erase one of the N objects
        ok, details = score_image(fewer, item.prompt)
        assert not ok and "count" in details["reason"]
        # the true image against the other count word
        n = len(scene.shapes)
        ok, details = score_image(image, item.prompt.replace(*(("three", "two") if n == 3 else ("two", "three")), 1))
        assert not ok and "count" in details["reason"]


def test_extra_object_is_rejected_unless_allowed():
    spec = Spec("single", (ObjectSpec("red", "circle"),))
    two = Scene(Spec("colour", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square"))),
                (PlacedShape("circle", "red", 6, 6, 18), PlacedShape("square", "blue", 40, 40, 18)))
    image = render(two)
    ok, details = score_image(image, "a red circle")
    assert not ok and "extra" in details["reason"]
    assert score_image(image, spec, ScorerConfig(allow_extra_objects=True))[0]


def test_blank_and_noise_images_are_rejected(bench):
    items, _ = bench
    blank = np.full((64, 64, 3), BACKGROUND, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for item in items[::40]:
        assert not score_image(blank, item.prompt)[0]
        assert not score_image(noise, item.prompt)[0]


def test_detections_are_accurate_on_a_known_scene():
    scene = Scene(Spec("two_objects", (ObjectSpec("green", "triangle"), ObjectSpec("yellow", "circle")),
                       relation="above"),
                  (PlacedShape("triangle", "green", 20, 4, 22), PlacedShape("circle", "yellow", 24, 40, 18)))
    dets = {d.colour: d for d in detect_objects(render(scene))}
    assert dets["green"].shape == "triangle" and dets["yellow"].shape == "circle"
    # within half a pixel: the triangle's apex row has no pixel centre inside it
    assert np.allclose(dets["green"].centre, scene.shapes[0].centre, atol=0.5)
    assert dets["yellow"].centre == scene.shapes[1].centre
    assert score_image(render(scene), "a green triangle above a yellow circle")[0]
    assert not score_image(render(scene), "a green triangle below a yellow circle")[0]


def test_connected_components_uses_8_connectivity():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4:6, 4:6] = True
    labels, n = connected_components(mask)
    assert n == 2 and labels[0, 0] == labels[1, 1] != labels[5, 5]
    assert (labels[~mask] == 0).all()


def test_evaluate_validates_lengths_and_config():
    with pytest.raises(ValueError, match="images for"):
        evaluate([np.zeros((64, 64, 3), np.uint8)], [])
    with pytest.raises(ValueError, match="min_area"):
        ScorerConfig(min_area=0)
    with pytest.raises(ValueError, match="unknown category"):
        ShapeBenchPrompt("a red circle", 0, "colors")


def test_an_evaluation_records_what_made_its_calls_cheaper(random_pipeline):
    """Two results that differ only in TomeMGT or context reuse must not read as the same setting."""
    from mgtq.evaluation import evaluate_editing, evaluate_pipeline, summary_line
    from mgtq.merging import apply_tomemgt, remove_tomemgt

    fast = random_pipeline.settings.sampler.preset("fast")
    plain = evaluate_pipeline(random_pipeline, limit=2, progress=False)
    assert plain["token_merging"] is None and plain["local_nfe"] == 0 and plain["token_nfe"] == plain["nfe"]
    merged = evaluate_pipeline(random_pipeline, limit=2, sampler=fast, progress=False, token_merging=0.5)
    assert merged["token_merging"]["ratio"] == 0.5 and 0 < merged["local_nfe"] < merged["nfe"]
    assert merged["token_nfe"] < merged["nfe"]
    assert "local, TomeMGT 0.5)" in summary_line(merged) and "local" not in summary_line(plain)
    apply_tomemgt(random_pipeline, 0.25)
    try:
        assert evaluate_pipeline(random_pipeline, limit=1, progress=False)["token_merging"]["ratio"] == 0.25
        assert evaluate_pipeline(random_pipeline, limit=1, progress=False, token_merging=0)["token_merging"] is None
        assert evaluate_editing(random_pipeline, "inpaint", limit=1, progress=False)["token_merging"]["ratio"] == 0.25
    finally:
        remove_tomemgt(random_pipeline)


def test_evaluation_is_reproducible_and_seed_offset_draws_again(random_pipeline):
    from mgtq.evaluation import evaluate_pipeline
    from mgtq.sampling import SamplerConfig

    sampler = SamplerConfig(num_steps=2, guidance_scale=0.0)
    first = evaluate_pipeline(random_pipeline, limit=5, sampler=sampler, progress=False)
    again = evaluate_pipeline(random_pipeline, limit=5, sampler=sampler, progress=False, reference_tokens=first["tokens"])
    other = evaluate_pipeline(random_pipeline, limit=5, sampler=sampler, progress=False, seed_offset=1_000_000,
                              reference_tokens=first["tokens"])
    assert again["token_agreement"] == 1.0
    assert other["token_agreement"] < 0.9
    assert first["n"] == other["n"] == 5
    # what it takes to make a result again: the offset, each image's own seed, the batch size, the scorer, mgtq
    assert (first["seed_offset"], other["seed_offset"], other["batch_size"]) == (0, 1_000_000, 16)
    assert [r["image_seed"] - r["seed"] for r in other["per_prompt"]] == [1_000_000] * 5
    assert first["scorer"] == dataclasses.asdict(ScorerConfig()) and first["mgtq_version"] == mgtq.__version__
    assert "model" in first  # the folder it was loaded from; None for a pipeline built in memory
