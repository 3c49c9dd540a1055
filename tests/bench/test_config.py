"""mgtq.bench.config: bench cases from the config, its one validator, default output paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgtq.bench import BenchCase, BenchConfig, MeasureSettings


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown format"):
        BenchConfig(formats=("bf16", "int3"))
    with pytest.raises(ValueError, match="unknown peer"):
        BenchConfig(peers=("bitsandbytes",))
    with pytest.raises(ValueError, match="TomeMGT"):
        BenchCase("quanto-w4a8", tome=0.5)
    cases = BenchConfig(formats=("bf16", "scq"), tome=(0, 0.5), offload=True, peers=("quanto-w4a8",)).cases()
    assert [c.label for c in cases] == ["bf16", "bf16+tome0.5", "scq", "scq+tome0.5", "bf16+offload",
                                        "scq+offload", "quanto-w4a8"]
    cases = BenchConfig(formats=("bf16",), tome=(0, 0.5), tome_blocks=("joint", "all")).cases()
    assert [c.label for c in cases] == ["bf16", "bf16+tome0.5", "bf16+tome0.5-all"]
    with pytest.raises(ValueError, match="tome_blocks"):
        BenchConfig(tome_blocks=("mlp",))


def test_default_outputs_go_to_the_working_folder():
    assert BenchConfig().output_paths("tiny-shapes") == {"json": Path("bench_tiny-shapes.json"),
                                                         "md": Path("bench_tiny-shapes.md")}
    assert BenchConfig(json="out/x.json").output_paths("tiny-shapes")["md"] == Path("out/x.md")


def test_config_is_checked_by_the_one_validator_and_forkserver_is_deprecated():
    with pytest.raises(ValueError, match="bench.isolation must be one of"):
        BenchConfig(isolation="fork")
    with pytest.raises(ValueError, match="measure.repeats must be an integer"):
        MeasureSettings(repeats=1.5)
    with pytest.raises(ValueError, match="case.offload must be true or false"):
        BenchCase("bf16", offload="yes")
    with pytest.warns(DeprecationWarning, match="forkserver"):
        assert BenchConfig(isolation="forkserver").isolation == "spawn"


def test_bench_cases_carry_the_tome_options():
    from mgtq.bench import BenchConfig

    cases = BenchConfig(formats=("bf16",), tome=(0, 0.5), tome_options={"locality": "global"}).cases()
    assert [c.tome_options for c in cases] == [{}, {"locality": "global"}]
    with pytest.raises(ValueError, match="localty"):
        BenchConfig(formats=("bf16",), tome=(0.5,), tome_options={"localty": "global"})
    with pytest.raises(ValueError, match="use tome / tome_blocks"):
        BenchConfig(formats=("bf16",), tome=(0.5,), tome_options={"ratio": 0.3})


def test_the_whole_image_sampler_is_a_preset_and_reuse_on_the_models_settings():
    from mgtq.reuse.config import ReuseConfig
    from mgtq.sampling import SamplerConfig

    model = SamplerConfig(num_steps=6, guidance_scale=2.0, timestep_convention="mask_ratio")
    assert MeasureSettings().image_sampler(model) == model  # no preset, no reuse: the model's settings
    fast = MeasureSettings(sampler="fast").image_sampler(model)
    assert fast.reuse == ReuseConfig(interval=4, group="cells", warmup=5)
    assert (fast.num_steps, fast.guidance_scale, fast.timestep_convention) == (6, 2.0, "mask_ratio")
    measure = MeasureSettings(sampler="fast", reuse=ReuseConfig(interval=2, group="cells", warmup=2))
    assert measure.image_sampler(model).reuse.interval == 2
    assert MeasureSettings.from_dict(measure.to_dict()) == measure  # crosses to the case process as a dict
    assert not MeasureSettings(sampler="fast", reuse=ReuseConfig()).image_sampler(model).reuse.enabled
    with pytest.raises(ValueError, match="measure.sampler must be a sampler preset"):
        MeasureSettings(sampler="turbo")
    with pytest.raises(ValueError, match="measure.reuse.interval must be an integer"):
        MeasureSettings.from_dict({"reuse": {"interval": "often"}})
    both = BenchConfig(formats=("bf16",), tome=(0, 0.5), measure=MeasureSettings(sampler="fast"))
    assert [case.tome for case in both.cases()] == [0, 0.5]  # TomeMGT runs inside the full steps of reuse
