"""ShapeBench-Edit: seeded editing tasks on scenes of two objects, scored by the ShapeBench scorer.

- inpaint:  one object's region is erased and masked; the prompt is the scene's full caption.
- replace:  one object's region is erased and masked; the caption changes that object's colour or shape.
- outpaint: the left or right third of the scene is removed (an `outpaint_canvas`); the prompt is the
            caption.
- img2img:  the whole scene is re-drawn at strength 0.5 and 0.8 with a caption that changes one
            object's colour or shape.

An object's region is its side of the line through the middle of the gap between the two objects
(along the axis where they are farther apart): about half the image, so the model has room to place
the object, as in text-to-image, while the other object and its side stay given. (A mask of just the
object's box leaves MaskGIT a hole whose first, most confident tokens are background.)
The output must show the item's `prompt` (the scorer reads the pixels only). An item is a pure
function of its task, seed and category, like a ShapeBench prompt; the seed is also the generation
seed. Splits use disjoint seeds as ShapeBench's do, and all seeds lie above ShapeBench's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .shapebench import SEED_STRIDE, SPLITS
from .world import (BACKGROUND, CATEGORIES, COLOURS, IMAGE_SIZE, SHAPES, Scene, Spec, parse_prompt, render,
                    sample_scene, spec_to_caption)

EDIT_TASKS: tuple[str, ...] = ("inpaint", "replace", "outpaint", "img2img")
IMG2IMG_STRENGTHS: tuple[float, ...] = (0.5, 0.8)
EDIT_CATEGORIES: tuple[str, ...] = ("colour", "two_objects")  # ShapeBench's scenes of two objects
DEFAULT_PER_TASK = 64
# Task k draws seeds EDIT_SEED_BASE + SEED_STRIDE·k + split offset + i: above ShapeBench's five
# categories, disjoint across tasks, and val disjoint from test as in ShapeBench.
EDIT_SEED_BASE = len(CATEGORIES) * SEED_STRIDE
OUTPAINT_WIDTH = IMAGE_SIZE // 3  # "a third" of the 64 px scene, in whole pixels


@dataclass(frozen=True)
class EditItem:
    """One ShapeBench-Edit item.

    prompt: the caption the output must show; seed: scene and generation seed; category: the source
    scene's (one of EDIT_CATEGORIES); target: the masked or changed object (index into the scene's
    objects; None for outpaint); side: "left"/"right" (outpaint only); strength: img2img only.
    """

    task: str
    prompt: str
    seed: int
    category: str
    target: int | None = None
    side: str | None = None
    strength: float | None = None

    def __post_init__(self) -> None:
        if self.task not in EDIT_TASKS:
            raise ValueError(f"unknown editing task {self.task!r}; choose one of {EDIT_TASKS}")
        if self.category not in EDIT_CATEGORIES:
            raise ValueError(f"category must be one of {EDIT_CATEGORIES}, got {self.category!r}")
        if (self.side is not None) != (self.task == "outpaint") or self.side not in (None, "left", "right"):
            raise ValueError(f"side is 'left' or 'right' for outpaint items and None otherwise, got {self.side!r}")
        if (self.strength is not None) != (self.task == "img2img"):
            raise ValueError("strength is set for img2img items and only for them")
        if (self.target is None) != (self.task == "outpaint") or self.target not in (None, 0, 1):
            raise ValueError(f"target is an object index 0 or 1 (None for outpaint), got {self.target!r}")


def edit_scene(item: EditItem) -> Scene:
    """The item's source scene."""
    return sample_scene(np.random.default_rng(item.seed), item.category)


def changed_spec(spec: Spec, index: int, rng: np.random.Generator) -> Spec:
    """`spec` with object `index`'s colour or shape (drawn from rng) changed to another value that keeps it valid."""
    objects = list(spec.objects)
    old, other = objects[index], objects[1 - index]
    attribute = ("colour", "shape")[int(rng.integers(2))]
    values = COLOURS if attribute == "colour" else SHAPES
    candidates = []
    for value in values:
        new = replace(old, **{attribute: value})
        distinct = new.colour != other.colour if spec.category == "colour" else new != other
        if value != getattr(old, attribute) and distinct:
            candidates.append(new)
    objects[index] = candidates[int(rng.integers(len(candidates)))]
    return Spec(spec.category, tuple(objects), region=spec.region, relation=spec.relation)


def shapebench_edit_items(task: str, per_task: int = DEFAULT_PER_TASK, split: str = "test") -> list[EditItem]:
    """The items of one task: `per_task` scenes alternating over EDIT_CATEGORIES (img2img: each scene at
    every strength of IMG2IMG_STRENGTHS, scene by scene). Deterministic in (task, per_task, split)."""
    if task not in EDIT_TASKS:
        raise ValueError(f"unknown editing task {task!r}; choose one of {EDIT_TASKS}")
    if not 1 <= per_task <= SEED_STRIDE // 2:
        raise ValueError(f"per_task must be in [1, {SEED_STRIDE // 2}], got {per_task}")
    if split not in SPLITS:
        raise ValueError(f"unknown ShapeBench split {split!r}; choose one of {sorted(SPLITS)}")
    items = []
    for i in range(per_task):
        seed = EDIT_SEED_BASE + SEED_STRIDE * EDIT_TASKS.index(task) + SPLITS[split] + i
        category = EDIT_CATEGORIES[i % len(EDIT_CATEGORIES)]
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, category)  # the scene's draws come first: edit_scene repeats them
        if task == "outpaint":
            side = ("left", "right")[(i // len(EDIT_CATEGORIES)) % 2]  # both sides for both categories
            items.append(EditItem(task, spec_to_caption(scene.spec), seed, category, side=side))
            continue
        target = int(rng.integers(2))
        prompt = spec_to_caption(scene.spec if task == "inpaint" else changed_spec(scene.spec, target, rng))
        strengths = IMG2IMG_STRENGTHS if task == "img2img" else (None,)
        items += [EditItem(task, prompt, seed, category, target=target, strength=s) for s in strengths]
    return items


def target_scene(item: EditItem) -> Scene:
    """A scene the output should look like: the source scene with the item's change, same layout."""
    scene = edit_scene(item)
    spec = parse_prompt(item.prompt)
    shapes = tuple(replace(s, colour=o.colour, shape=o.shape) for s, o in zip(scene.shapes, spec.objects))
    return Scene(spec, shapes, scene.image_size)


def object_region(scene: Scene, index: int) -> np.ndarray:
    """bool (H, W): the side of the gap between the two objects that holds object `index`."""
    a, b = scene.shapes[index].box, scene.shapes[1 - index].box  # (x0, y0, x1, y1)
    cuts = []
    for axis in (0, 1):  # 0: a vertical line (x), 1: a horizontal one (y)
        lo, hi = axis, axis + 2
        if a[hi] <= b[lo]:  # a before b along this axis
            cuts.append((b[lo] - a[hi], axis, (a[hi] + b[lo]) // 2, True))
        elif b[hi] <= a[lo]:
            cuts.append((a[lo] - b[hi], axis, (b[hi] + a[lo]) // 2, False))
    _, axis, cut, before = max(cuts)  # scenes guarantee a gap along at least one axis
    coords = np.arange(scene.image_size)
    side = coords < cut if before else coords >= cut
    return np.broadcast_to(side[None, :] if axis == 0 else side[:, None], (scene.image_size,) * 2).copy()


def edit_inputs(item: EditItem) -> tuple[np.ndarray, np.ndarray | None]:
    """(input image uint8 (64, 64, 3), mask bool (64, 64), True = repaint; None for img2img).

    The masked region is erased to the background before it is given to the model, so the encoder
    never sees what it is asked to draw.
    """
    scene = edit_scene(item)
    image = render(scene)
    if item.task == "img2img":
        return image, None
    mask = np.zeros(image.shape[:2], dtype=bool)
    if item.task == "outpaint":
        columns = slice(0, OUTPAINT_WIDTH) if item.side == "left" else slice(IMAGE_SIZE - OUTPAINT_WIDTH, IMAGE_SIZE)
        mask[:, columns] = True
    else:
        mask = object_region(scene, item.target)
    image[mask] = BACKGROUND
    return image, mask


__all__ = ["EDIT_TASKS", "IMG2IMG_STRENGTHS", "EDIT_CATEGORIES", "DEFAULT_PER_TASK", "EditItem", "edit_scene",
           "changed_spec", "shapebench_edit_items", "target_scene", "object_region", "edit_inputs"]
