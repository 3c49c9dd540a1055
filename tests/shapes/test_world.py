"""The shapes world: determinism, grammar round trips, rendering invariants."""

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgtq.shapes import world
from mgtq.shapes.world import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    IMAGE_SIZE,
    MIN_GAP,
    PALETTE,
    ObjectSpec,
    PlacedShape,
    Scene,
    Spec,
    all_specs,
    caption,
    parse_prompt,
    region_holds,
    relation_holds,
    render,
    sample_scene,
    shape_mask,
    spec_to_caption,
    vocabulary,
)


def test_same_seed_same_scene_image_caption():
    for seed in range(20):
        a, b = sample_scene(seed), sample_scene(np.random.default_rng(seed))
        assert a == b
        assert caption(a) == caption(b)
        assert np.array_equal(render(a), render(b))


def test_different_seeds_give_different_scenes():
    scenes = {sample_scene(seed) for seed in range(50)}
    assert len(scenes) == 50


def test_no_global_rng_is_used_or_touched():
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    for seed in range(10):
        render(sample_scene(seed))
    assert np.array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py


def test_rng_argument_is_validated():
    with pytest.raises(TypeError, match="Generator or int"):
        sample_scene("7")


@pytest.mark.parametrize("category", CATEGORIES)
def test_sample_scene_respects_category(category):
    for seed in range(10):
        assert sample_scene(seed, category).spec.category == category


def test_unknown_category_is_an_error():
    with pytest.raises(ValueError, match="unknown category"):
        sample_scene(0, "colors")


def test_every_spec_round_trips_through_its_caption():
    specs = all_specs()
    assert len(specs) == len(set(specs)) > 1000
    captions = [spec_to_caption(s) for s in specs]
    assert len(set(captions)) == len(captions)  # the grammar is unambiguous
    for spec, text in zip(specs, captions):
        assert parse_prompt(text) == spec


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_sampled_scene_caption_parses_back(seed):
    scene = sample_scene(seed)
    assert parse_prompt(caption(scene)) == scene.spec


def test_example_captions():
    assert parse_prompt("a red circle") == Spec("single", (ObjectSpec("red", "circle"),))
    assert parse_prompt("A blue square on the left.").region == "left"
    assert parse_prompt("a green triangle above a yellow circle").relation == "above"
    spec = parse_prompt("a red circle to the left of a blue square")
    assert spec.relation == "left_of" and spec.objects[1] == ObjectSpec("blue", "square")
    assert parse_prompt("two purple squares").objects == (ObjectSpec("purple", "square"),) * 2
    assert parse_prompt("a red circle and a blue square").category == "colour"


@pytest.mark.parametrize(
    "text",
    ["a pink circle", "four red circles", "a red circle on the side", "red circle", "an red circle",
     "a red circle and a red square", "a red circle above a red circle", "two red circle", ""],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_prompt(text)


def test_vocabulary_is_exactly_the_caption_words():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    words = {w for s in all_specs() for w in spec_to_caption(s).split()}
    assert set(vocab) == words
    assert {"red", "circle", "triangles", "above", "left", "three"} <= words


def test_palette_is_well_separated():
    colours = [np.array(PALETTE[c], float) for c in COLOURS] + [np.array(BACKGROUND, float)]
    assert len(COLOURS) >= 6
    for a, b in itertools.combinations(colours, 2):
        assert np.linalg.norm(a - b) >= 140


def test_render_is_flat_uint8_and_matches_the_masks():
    for seed in range(40):
        scene = sample_scene(seed)
        image = render(scene)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        allowed = {tuple(BACKGROUND)} | {tuple(PALETTE[s.colour]) for s in scene.shapes}
        assert {tuple(p) for p in image.reshape(-1, 3)} == allowed
        masks = [shape_mask(s) for s in scene.shapes]
        for m, s in zip(masks, scene.shapes):
            assert (image[m] == PALETTE[s.colour]).all()
            assert m.sum() > 0.4 * s.size**2  # triangles fill half their box
        assert sum(m.sum() for m in masks) == np.logical_or.reduce(masks).sum()  # no overlap


def test_fill_ratios_of_the_shapes():
    for size in world.SIZES:
        ratios = {
            name: shape_mask(PlacedShape(name, "red", 10, 10, size)).sum() / size**2
            for name in world.SHAPES
        }
        assert ratios["square"] == 1.0
        assert abs(ratios["circle"] - np.pi / 4) < 0.05
        assert abs(ratios["triangle"] - 0.5) < 0.06


def test_stated_positions_hold_with_margin():
    for seed in range(200):
        scene = sample_scene(seed)
        spec = scene.spec
        if spec.region is not None:
            cx, cy = scene.shapes[0].centre
            offset = {"left": 32 - cx, "right": cx - 32, "top": 32 - cy, "bottom": cy - 32}[spec.region]
            assert offset >= 12
        if spec.relation is not None:
            (ax, ay), (bx, by) = scene.shapes[0].centre, scene.shapes[1].centre
            d = {"left_of": bx - ax, "right_of": ax - bx, "above": by - ay, "below": ay - by}[spec.relation]
            assert d >= 18


def test_scene_validation_rejects_bad_layouts():
    spec = Spec("colour", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square")))
    a = PlacedShape("circle", "red", 10, 10, 14)
    with pytest.raises(ValueError, match="closer than"):
        Scene(spec, (a, PlacedShape("square", "blue", 10 + 14 + MIN_GAP - 1, 10, 14)))
    with pytest.raises(ValueError, match="inside the image"):
        Scene(spec, (a, PlacedShape("square", "blue", 55, 10, 14)))
    with pytest.raises(ValueError, match="does not realise"):
        Scene(spec, (a, PlacedShape("square", "green", 40, 40, 14)))
    left = Spec("position", (ObjectSpec("red", "circle"),), region="left")
    with pytest.raises(ValueError, match="not clearly left"):
        Scene(left, (PlacedShape("circle", "red", 20, 20, 14),))
    assert region_holds(PlacedShape("circle", "red", 4, 20, 14), "left")
    assert not relation_holds(a, PlacedShape("square", "blue", 40, 40, 14), "left_of")  # diagonal


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="unknown colour"):
        ObjectSpec("pink", "circle")
    with pytest.raises(ValueError, match="unknown shape"):
        ObjectSpec("red", "hexagon")
    with pytest.raises(ValueError, match="different colours"):
        Spec("colour", (ObjectSpec("red", "circle"), ObjectSpec("red", "square")))
    with pytest.raises(ValueError, match="identical objects"):
        Spec("counting", (ObjectSpec("red", "circle"), ObjectSpec("blue", "circle")))
    with pytest.raises(ValueError, match="region"):
        Spec("single", (ObjectSpec("red", "circle"),), region="left")
