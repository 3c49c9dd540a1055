"""ShapeBench-Edit (mgtq.shapes.edit): seeded items, disjoint splits, sound inputs and ground truths,
and its evaluation (mgtq.evaluation.evaluate_editing, `mgtq eval --task`)."""

import json

import numpy as np
import pytest

from mgtq.cli import build_parser, main
from mgtq.evaluation import evaluate_editing
from mgtq.shapes import BACKGROUND, parse_prompt, render, score_image, shapebench_prompts
from mgtq.shapes.shapebench import SPLITS
from mgtq.shapes.edit import (EDIT_TASKS, IMG2IMG_STRENGTHS, EditItem, edit_inputs, edit_scene, object_region,
                              shapebench_edit_items, target_scene)


def test_items_are_seeded_and_splits_disjoint():
    seeds = {}
    for task in EDIT_TASKS:
        test, val = shapebench_edit_items(task, 16), shapebench_edit_items(task, 16, split="val")
        assert test == shapebench_edit_items(task, 16)  # deterministic
        assert shapebench_edit_items(task, 8) == test[: len(shapebench_edit_items(task, 8))]  # prefix-stable
        seeds[task] = {it.seed for it in test}, {it.seed for it in val}
        assert not seeds[task][0] & seeds[task][1]
    every = [s for pair in seeds.values() for split in pair for s in split]
    assert len(every) == len(set(every))  # disjoint across tasks too
    shapebench = {it.seed for split in ("test", "val") for it in shapebench_prompts(split=split)}
    assert not shapebench & set(every)


def test_mgtq_eval_offers_every_editing_task_and_split():
    choices = {a.dest: a.choices for a in build_parser(commands=["eval"]).commands["eval"]._actions if a.choices}
    assert tuple(choices["task"]) == ("shapebench", *EDIT_TASKS, "all")
    assert tuple(choices["split"]) == tuple(SPLITS)


def test_img2img_has_each_scene_at_both_strengths():
    items = shapebench_edit_items("img2img", 4)
    assert [it.strength for it in items] == list(IMG2IMG_STRENGTHS) * 4
    assert [it.seed for it in items[::2]] == [it.seed for it in items[1::2]]


@pytest.mark.parametrize("task", EDIT_TASKS)
def test_ground_truth_edits_are_accepted_and_inputs_are_erased(task):
    for item in shapebench_edit_items(task, 32):
        assert score_image(render(target_scene(item)), item.prompt)[0], item
        image, mask = edit_inputs(item)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        if task == "img2img":
            assert mask is None and np.array_equal(image, render(edit_scene(item)))
            continue
        assert (image[mask] == BACKGROUND).all() and mask.any()
        if task in ("inpaint", "replace"):
            assert not score_image(image, item.prompt)[0]  # the object to draw is gone from the input


def test_object_region_holds_the_target_and_not_the_other_object():
    fractions = []
    for item in shapebench_edit_items("inpaint", 32):
        scene = edit_scene(item)
        region = object_region(scene, item.target)
        x0, y0, x1, y1 = scene.shapes[item.target].box
        assert region[y0:y1, x0:x1].all()
        x0, y0, x1, y1 = scene.shapes[1 - item.target].box
        assert not region[y0:y1, x0:x1].any()
        fractions.append(region.mean())
    assert 0.35 < np.mean(fractions) < 0.65  # about half the image is given


@pytest.mark.parametrize("task", ["replace", "img2img"])
def test_changed_captions_change_one_attribute_of_the_target(task):
    for item in shapebench_edit_items(task, 32):
        source, target = edit_scene(item).spec, parse_prompt(item.prompt)
        assert target.category == source.category and target.relation == source.relation
        assert target.objects[1 - item.target] == source.objects[1 - item.target]
        old, new = source.objects[item.target], target.objects[item.target]
        assert (old.colour != new.colour) + (old.shape != new.shape) == 1


def test_inpaint_outpaint_captions_are_the_scenes():
    for task in ("inpaint", "outpaint"):
        for item in shapebench_edit_items(task, 8):
            assert parse_prompt(item.prompt) == edit_scene(item).spec
    assert {it.side for it in shapebench_edit_items("outpaint", 8)} == {"left", "right"}


@pytest.mark.parametrize("bad, match", [
    (dict(task="paint"), "unknown editing task"),
    (dict(category="single"), "category must be one of"),
    (dict(strength=0.5), "strength is set for img2img"),
    (dict(target=2), "target is an object index"),
    (dict(side="left"), "side is 'left' or 'right' for outpaint"),
])
def test_item_validation(bad, match):
    fields = dict(task="inpaint", prompt="a red circle and a blue square", seed=1, category="colour", target=0)
    with pytest.raises(ValueError, match=match):
        EditItem(**{**fields, **bad})


def test_evaluate_editing_reports_accuracy_and_kept_tokens(random_pipeline):
    for task in EDIT_TASKS:
        result = evaluate_editing(random_pipeline, task, limit=4, progress=False, batch_size=3)
        assert result["n"] == 4 and result["task"] == task and 0 <= result["overall"] <= 1
        if task == "img2img":
            assert result["preserved"] is None and set(result["per_strength"]) == {"0.5", "0.8"}
        else:
            assert result["preserved"] == 1.0
    with pytest.raises(ValueError, match="unknown editing task"):
        evaluate_editing(random_pipeline, "paint", limit=1, progress=False)


def test_cli_eval_task(tmp_path, random_pipeline_dir, capsys):
    out = tmp_path / "edit.json"
    assert main(["eval", "--model", str(random_pipeline_dir), "--task", "all", "--limit", "2", "--no-progress",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"ShapeBench-Edit {task}" in printed for task in EDIT_TASKS)
    assert printed.count("\n  on ") == 1  # the kernels that ran, as a ShapeBench eval prints them, once
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == set(EDIT_TASKS) and data["tasks"]["outpaint"]["preserved"] == 1.0
    assert main(["eval", "--model", str(random_pipeline_dir), "--task", "paint"]) == 2
