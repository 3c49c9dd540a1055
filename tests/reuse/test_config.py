"""ReuseConfig: validated when built, a SamplerConfig section, off by default."""

import pytest

from mgtq.reuse.config import ReuseConfig
from mgtq.sampling import SamplerConfig


def test_off_by_default_and_full_step_pattern():
    assert not SamplerConfig().reuse.enabled and SamplerConfig().reuse == ReuseConfig()
    config = ReuseConfig(interval=3, warmup=2)
    assert [config.is_full(i) for i in range(8)] == [True, True, True, False, False, True, False, False]


def test_a_sampler_mapping_builds_it_and_bad_values_name_the_key():
    config = SamplerConfig.from_dict({"reuse": {"interval": 2, "group": "masked"}})
    assert config.reuse == ReuseConfig(interval=2, group="masked")
    assert SamplerConfig().with_overrides({"reuse.interval": 4}).reuse.interval == 4
    assert ReuseConfig().refresh == 0.0  # K/V refresh is off by default
    assert SamplerConfig.from_dict({"reuse": {"interval": 3, "refresh": "0.1"}}).reuse.refresh == 0.1  # YAML text
    with pytest.raises(ValueError, match="reuse.group must be one of"):
        SamplerConfig.from_dict({"reuse": {"group": "nearest"}})
    with pytest.raises(ValueError, match="reuse.intervall"):
        SamplerConfig.from_dict({"reuse": {"intervall": 2}})


@pytest.mark.parametrize("bad, message", [(dict(interval=0), "interval must be an integer ≥ 1"),
                                          (dict(interval=2.5), "interval must be an integer"),
                                          (dict(warmup=-1), "warmup must be an integer ≥ 0"),
                                          (dict(bucket=0), "bucket must be an integer ≥ 1"),
                                          (dict(refresh=1.5), "refresh must be a fraction in \\[0, 1\\]"),
                                          (dict(refresh=-0.1), "refresh must be a fraction"),
                                          (dict(refresh=float("nan")), "reuse.refresh must be a finite number")])
def test_bad_values_are_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ReuseConfig(**bad)
