"""mgtq.scq.synthesis: calibration prompts come from ShapeBench's val split, not the scored one."""

from mgtq.scq.recipe import recipe_from_dict
from mgtq.scq.synthesis import calibration_prompts


def test_shapebench_calibration_prompts_are_not_the_scored_ones():
    from mgtq.shapes import shapebench_prompts

    recipe = recipe_from_dict({"prompts": {"source": "shapebench", "count": 40, "seed": 5}})
    pairs = calibration_prompts(recipe.prompts)
    assert [seed for _, seed in pairs] == list(range(5, 45))
    scored = [it.prompt for it in shapebench_prompts()]
    val = [it.prompt for it in shapebench_prompts(split="val")]
    assert {p for p, _ in pairs} <= set(val)
    assert [p for p, _ in pairs] != [p for p in scored[: len(pairs)]]
