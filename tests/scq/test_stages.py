"""mgtq.scq.stages: `mgtq calibrate --no-progress` hides the pipeline's loading bar; the pipeline leaves the device
once it has encoded the prompts."""

import datasets
import pytest

from mgtq.scq import stages


@pytest.mark.parametrize("progress", [False, True])
def test_the_stage_pipeline_loads_with_the_runs_progress_setting(progress, monkeypatch, tmp_path):
    from mgtq.scq.recipe import recipe_from_dict

    calls = []
    monkeypatch.setattr(stages.MGTPipeline, "from_pretrained", lambda *args, **kwargs: calls.append(kwargs))
    ctx = stages.StageContext(recipe_from_dict({}), run=None, model_dir=tmp_path, fingerprints={}, progress=progress)
    ctx.pipe
    assert calls[0]["progress"] is progress  # its "Loading weights" bar showed under --no-progress


def test_the_pipeline_leaves_the_device_once_the_prompts_are_encoded(monkeypatch, tmp_path):
    # A run resumed at magnitudes or secondary loads the pipeline only to encode the prompts; it must not stay on
    # the GPU beside the QAT model those stages measure.
    from mgtq.scq.recipe import recipe_from_dict

    events = []

    class Pipe:
        def to(self, device):
            events.append(("to", device))
            return self

    def encode(run, pipe):
        events.append(("encode", pipe))
        return "data"

    monkeypatch.setattr(stages, "load_calibration_data", encode)
    ctx = stages.StageContext(recipe_from_dict({}), run=None, model_dir=tmp_path, fingerprints={}, device="cuda")
    ctx.__dict__["pipe"] = pipe = Pipe()  # as the cached property holds it once loaded on the device
    assert ctx.data == "data" and ctx.data == "data"
    assert events == [("encode", pipe), ("to", "cpu")]


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_synthesis_samples_in_its_dtype_and_the_later_stages_get_the_model_as_saved(dtype, random_pipeline_dir,
                                                                                       monkeypatch, tmp_path):
    import torch

    from mgtq.scq.recipe import recipe_from_dict

    used = []
    monkeypatch.setattr(stages.synthesis, "synthesize", lambda pipe, *args, **kwargs: used.append(pipe) or
                        datasets.Dataset.from_dict({"prompt": ["a red circle"]}))
    recipe = recipe_from_dict({"prompts": {"count": 1}, "synthesis": {"dtype": dtype}})
    ctx = stages.StageContext(recipe, run=stages.RunFolder(tmp_path / "run"), model_dir=random_pipeline_dir,
                              fingerprints={"synth": "fp"}, progress=False)
    summary = stages._synthesize(ctx).summary
    assert used[0].dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)  # saved in float32
    assert (used[0] is ctx.__dict__.get("pipe")) == (dtype == "auto")  # else loaded for the stage alone
    assert ctx.pipe.dtype == torch.float32 and summary["sampler"] == ctx.sampler.to_dict()
