"""The sampler's command-line flags: the context-reuse flags set SamplerConfig.reuse."""

import argparse

import pytest

from mgtq.reuse.config import ReuseConfig
from mgtq.sampling import SamplerConfig
from mgtq.sampling.cli_args import add_sampler_arguments, sampler_config_from_args


def test_reuse_flags_set_the_reuse_section_and_default_to_off():
    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    base = SamplerConfig(num_steps=16)
    assert sampler_config_from_args(parser.parse_args([]), base).reuse == ReuseConfig()
    args = parser.parse_args(["--reuse-interval", "3", "--reuse-group", "masked", "--reuse-warmup", "2"])
    assert sampler_config_from_args(args, base).reuse == ReuseConfig(interval=3, group="masked", warmup=2)
    fast = sampler_config_from_args(parser.parse_args(["--sampler", "fast"]), base)
    assert fast.reuse == ReuseConfig(interval=4, group="cells", warmup=5) and fast.num_steps == 16
    off = sampler_config_from_args(parser.parse_args(["--sampler", "fast", "--reuse-interval", "1"]), base)
    assert not off.reuse.enabled
    refresh = sampler_config_from_args(parser.parse_args(["--sampler", "fast", "--reuse-refresh", "0.1"]), base)
    assert refresh.reuse == ReuseConfig(interval=4, group="cells", warmup=5, refresh=0.1)


def test_generate_with_reuse_runs_local_steps(tmp_path, random_pipeline_dir, monkeypatch):
    from mgtq.cli import main
    from mgtq.reuse import ContextCache

    local_steps = []
    local_step = ContextCache.local_step
    monkeypatch.setattr(ContextCache, "local_step", lambda self, active: local_steps.append(1) or local_step(self, active))
    out = tmp_path / "r.png"
    assert main(["generate", "--model", str(random_pipeline_dir), "--prompt", "a red circle", "--steps", "4",
                 "--reuse-interval", "2", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert out.exists() and len(local_steps) == 2  # steps 1 and 3


def test_inpaint_schedule_flag_sets_or_clears_the_inpainting_schedule():
    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    base = SamplerConfig(schedule="pow", rho=2.0)
    assert sampler_config_from_args(parser.parse_args([]), base).for_inpainting().schedule == "linear"
    cosine = sampler_config_from_args(parser.parse_args(["--inpaint-schedule", "cosine"]), base)
    assert cosine.inpaint_schedule == "cosine" and cosine.for_inpainting().schedule == "cosine"
    same = sampler_config_from_args(parser.parse_args(["--inpaint-schedule", "same"]), base)
    assert same.inpaint_schedule is None and same.for_inpainting() == base.replace(inpaint_schedule=None)


def test_zsampling_steps_are_checked_against_the_commands_steps_not_the_checkpoints():
    from mgtq.cli import _sampler, build_parser

    class Pipe:  # what _sampler reads of a pipeline
        class settings:
            sampler = SamplerConfig(num_steps=16, guidance_scale=2.0)

    args = build_parser().parse_args(["generate", "--prompt", "x", "--steps", "32", "--zsampling", "masked",
                                      "--zsampling-steps", "20:30"])
    config = _sampler(args, Pipe)
    assert config.num_steps == 32 and config.zsampling.steps == tuple(range(20, 30))
    args = build_parser().parse_args(["generate", "--prompt", "x", "--zsampling", "masked", "--zsampling-steps", "20:30"])
    with pytest.raises(ValueError, match=r"zsampling.steps \[20.*beyond the last step 15 of num_steps 16"):
        _sampler(args, Pipe)
