"""The procedural shapes world (scenes → 64×64 images + captions) and ShapeBench.

    from mgtq.shapes import sample_scene, render, caption, shapebench_prompts, score_image
"""

from .shapebench import ShapeBenchPrompt, shapebench_scene, render_ground_truth, shapebench_prompts
from .edit import EDIT_TASKS, EditItem, edit_inputs, shapebench_edit_items, target_scene
from .scorer import Detection, ScorerConfig, detect_objects, evaluate, score_image
from .world import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    ObjectSpec,
    PlacedShape,
    Scene,
    Spec,
    all_specs,
    caption,
    parse_prompt,
    render,
    sample_layout,
    sample_scene,
    sample_spec,
    spec_to_caption,
    vocabulary,
)

__all__ = [
    "BACKGROUND", "CATEGORIES", "COLOURS", "IMAGE_SIZE", "PALETTE", "SHAPES",
    "ObjectSpec", "PlacedShape", "Scene", "Spec", "all_specs", "caption", "parse_prompt", "render",
    "sample_layout", "sample_scene", "sample_spec", "spec_to_caption", "vocabulary",
    "ShapeBenchPrompt", "shapebench_scene", "render_ground_truth", "shapebench_prompts",
    "EDIT_TASKS", "EditItem", "edit_inputs", "shapebench_edit_items", "target_scene",
    "Detection", "ScorerConfig", "detect_objects", "evaluate", "score_image",
]
