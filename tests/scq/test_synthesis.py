"""mgtq.scq.synthesis: calibration prompts come from ShapeBench's val split, not the scored one; the set without
images holds the same tokens."""

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


def test_without_images_the_set_has_the_same_tokens_and_nothing_is_decoded(random_pipeline, monkeypatch):
    import torch

    from mgtq.scq.synthesis import calibration_data, synthesize

    pairs, sampler = [("a red circle", 0), ("a blue square", 1)], random_pipeline.settings.sampler.replace(num_steps=2)
    full = synthesize(random_pipeline, pairs, sampler, 64, 2, progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the VQ decoder ran")

    monkeypatch.setattr(type(random_pipeline), "decode_tokens", no_decoding)
    tokens_only = synthesize(random_pipeline, pairs, sampler, 64, 2, progress=False, keep_images=False)
    assert set(full.column_names) - set(tokens_only.column_names) == {"image"}
    assert tokens_only["tokens"] == full["tokens"] and tokens_only["prompt"] == full["prompt"]
    grid = random_pipeline.token_grid(64, 64)
    a, b = calibration_data(full, random_pipeline, grid, 64), calibration_data(tokens_only, random_pipeline, grid, 64)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.text, b.text)
