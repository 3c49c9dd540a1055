"""ShapeBench: a fixed, code-generated prompt set for the shapes world (GenEval in spirit).

Every prompt carries the seed of the world scene it was captioned from, so the ground-truth image
of a prompt is ``render(shapebench_scene(p))``; the same seed is the one a generator should use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import CATEGORIES, Scene, caption, render, sample_scene

DEFAULT_PER_CATEGORY = 64  # 5 categories × 64 = 320 prompts
# Seeds of category k are SEED_STRIDE·k + i: disjoint across categories and stable when
# per_category changes (prompt i of a category never depends on how many prompts follow it).
SEED_STRIDE = 100_000
# The validation split draws the same categories from the upper half of each category's seed range,
# so sampler settings (CFG, temperatures) and calibration prompts can be chosen on prompts that
# are never the ones reported. "test" is ShapeBench proper.
SPLITS = {"test": 0, "val": SEED_STRIDE // 2}
MAX_PER_CATEGORY = SEED_STRIDE // 2


@dataclass(frozen=True)
class ShapeBenchPrompt:
    """One benchmark item: the caption, the seed of its scene (and generation), its category."""

    prompt: str
    seed: int
    category: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


def shapebench_scene(item: ShapeBenchPrompt) -> Scene:
    """The world scene a prompt was captioned from (its ground truth)."""
    return sample_scene(np.random.default_rng(item.seed), item.category)


def shapebench_prompts(per_category: int = DEFAULT_PER_CATEGORY, split: str = "test",
                       start: int = 0) -> list[ShapeBenchPrompt]:
    """The ShapeBench prompt list, ``per_category`` prompts per category in :data:`CATEGORIES` order.

    ``split`` is "test" (the benchmark) or "val" (other seeds, for tuning). ``start`` skips the first
    prompts of each category: a later stretch of the split, drawn as the first one is, e.g. val prompts
    no earlier run has seen, to confirm a choice made on the first ones. Deterministic: the same
    arguments always give the same list. Captions can repeat across seeds (e.g. 'single' has only 18
    distinct captions); each item is still a distinct scene and seed.
    """
    if per_category <= 0 or start < 0 or start + per_category > MAX_PER_CATEGORY:
        raise ValueError(f"per_category ≥ 1 and start ≥ 0 must end within the split's {MAX_PER_CATEGORY} prompts "
                         f"per category, got per_category {per_category}, start {start}")
    if split not in SPLITS:
        raise ValueError(f"unknown ShapeBench split {split!r}; choose one of {sorted(SPLITS)}")
    base_seed = SPLITS[split]
    items = []
    for k, category in enumerate(CATEGORIES):
        for i in range(start, start + per_category):
            seed = base_seed + SEED_STRIDE * k + i
            scene = sample_scene(np.random.default_rng(seed), category)
            items.append(ShapeBenchPrompt(caption(scene), seed, category))
    return items


def render_ground_truth(items: list[ShapeBenchPrompt]) -> np.ndarray:
    """Ground-truth images of ``items``: uint8 (N, 64, 64, 3)."""
    return np.stack([render(shapebench_scene(item)) for item in items])
