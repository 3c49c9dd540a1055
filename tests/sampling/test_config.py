"""SamplerConfig validation (mgtq.config's strict loader), presets, and the sampling package's imports."""

import ast
import json
import math
from pathlib import Path

import pytest
import yaml

import mgtq.sampling
from mgtq.sampling import NoiseConfig, SamplerConfig, ZSamplingConfig
from mgtq.sampling.presets import PRESET_NAMES, preset_fields

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("bad,message", [
    ({"guidance_scale": NAN}, "guidance_scale must be a finite number, got nan"),
    ({"guidance_scale": INF}, "guidance_scale must be a finite number, got inf"),
    ({"guidance_scale": "strong"}, "guidance_scale must be a number, got 'strong'"),
    ({"guidance_scale": -1}, "guidance_scale must be ≥ 0"),
    ({"rho": NAN}, "rho must be a finite number, got nan"),
    ({"rho": 0}, "rho must be > 0"),
    ({"gumbel_temperature": [NAN, 0]}, r"gumbel_temperature\[0\] must be a finite number, got nan"),
    ({"gumbel_temperature": [1, -INF]}, r"gumbel_temperature\[1\] must be a finite number, got -inf"),
    ({"gumbel_temperature": [1, 2, 3]}, "gumbel_temperature must have 2 entries"),
    ({"gumbel_temperature": 2}, "gumbel_temperature must be a list"),
    ({"num_steps": 2.5}, "num_steps must be an integer, got 2.5"),
    ({"num_steps": "16"}, "num_steps must be an integer"),
    ({"num_steps": True}, "num_steps must be an integer"),
    ({"num_steps": 0}, "num_steps must be a positive integer"),
    ({"schedule": "square"}, "schedule must be one of"),
    ({"timestep_convention": "seconds"}, "timestep_convention must be one of"),
    ({"noise": {"scale": NAN}}, "noise.scale must be a finite number, got nan"),
    ({"noise": {"curve": "piecewise_v"}}, "noise.curve must be one of"),
    ({"noise": {"knots": [[0, NAN], [1, 1]]}}, r"noise.knots\[0\]\[1\] must be a finite number"),
    ({"noise": "loud"}, "noise must be a mapping"),
    ({"differential": {"percent": INF}}, "differential.percent must be a finite number, got inf"),
    ({"differential": {"resample": "signed"}}, "differential.resample must be one of"),
    ({"zsampling": {"inversion_cfg": NAN}}, "zsampling.inversion_cfg must be a finite number, got nan"),
    ({"zsampling": {"inversion_cfg": "-1x"}}, "zsampling.inversion_cfg must be a number"),
    ({"zsampling": {"steps": [1, 2.5]}}, r"zsampling.steps\[1\] must be an integer"),
    ({"zsampling": {"steps": [-1]}}, "zsampling.steps must be non-negative"),
    ({"zsampling": {"remask": "demo"}}, "zsampling.remask must be one of"),
    ({"momentum": {"order": True}}, "momentum.order must be an integer"),
    ({"momentum": {"order": 3}}, "momentum.order must be one of"),
    ({"momentum": {"oder": 2}}, "unknown key 'momentum.oder'"),
    ({"steps": 3}, "unknown key 'steps'"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig.from_dict(bad)


def test_direct_construction_and_overrides_run_the_same_checks():
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got nan"):
        SamplerConfig(guidance_scale=NAN)
    with pytest.raises(ValueError, match="noise.scale must be a finite number, got inf"):
        NoiseConfig(scale=INF)
    with pytest.raises(ValueError, match="zsampling.inversion_cfg must be a finite number"):
        SamplerConfig().with_overrides({"zsampling.inversion_cfg": INF})
    with pytest.raises(ValueError, match="rho must be a finite number"):
        SamplerConfig().replace(rho=NAN)


def test_values_are_normalized():
    config = SamplerConfig.from_dict({"guidance_scale": 2, "gumbel_temperature": [1, "0.5"],
                                      "noise": {"knots": [[0, 1], [1, 0]]}, "zsampling": {"steps": [3, 1, 3]}})
    assert config.guidance_scale == 2.0 and isinstance(config.guidance_scale, float)
    assert config.gumbel_temperature == (1.0, 0.5)
    assert config.noise.knots == ((0.0, 1.0), (1.0, 0.0)) and config.zsampling.steps == (1, 3)


@pytest.mark.parametrize("inversion_cfg", [-1.0, -3, 0.0, 1.0, 9.5])
def test_any_finite_inversion_cfg_is_accepted(inversion_cfg):
    z = ZSamplingConfig(variant="masked", inversion_cfg=inversion_cfg)
    assert z.inversion_cfg == float(inversion_cfg)
    assert SamplerConfig(guidance_scale=1.0, zsampling=z).needs_unconditional == (inversion_cfg != 1.0)


def test_presets():
    assert PRESET_NAMES == ("vanilla", "paper-combo", "paper-combo-root", "fast")
    combo = SamplerConfig.preset("paper-combo", base=SamplerConfig(num_steps=16, guidance_scale=2.0))
    # the paper's combination tables: cosine + noise |cos πt| α=1 + differential 75 % + masked Z (inversion CFG 0)
    assert (combo.schedule, combo.noise.curve, combo.noise.scale) == ("cosine", "abs_cos", 1.0)
    assert (combo.differential.percent, combo.differential.resample) == (75.0, "abs")
    assert (combo.zsampling.variant, combo.zsampling.inversion_cfg, combo.zsampling.remask) == ("masked", 0.0, "paper")
    assert combo.momentum.order == 0 and (combo.num_steps, combo.guidance_scale) == (16, 2.0)
    root = SamplerConfig.preset("paper-combo-root")
    assert (root.schedule, root.rho) == ("root", 0.6) and root.replace(schedule="cosine", rho=1.0) == \
        SamplerConfig.preset("paper-combo")
    for name in PRESET_NAMES:  # every preset sets every trick field, so presets never inherit tricks
        assert set(preset_fields(name)) == {"schedule", "rho", "noise", "differential", "zsampling", "momentum", "reuse"}
        SamplerConfig.from_dict(preset_fields(name))
    fast = SamplerConfig.preset("fast", base=SamplerConfig(num_steps=48))
    assert fast.reuse.enabled and fast.replace(reuse={}) == SamplerConfig(num_steps=48)  # vanilla + reuse
    assert not SamplerConfig.preset("vanilla", base=fast).reuse.enabled  # a preset never inherits reuse
    with pytest.raises(ValueError, match="unknown sampler preset 'enhanced'"):
        SamplerConfig.preset("enhanced")


def test_preset_on_an_instance_starts_from_that_instance():
    """The class call starts from `base` (default SamplerConfig()); an instance call starts from the instance,
    so a checkpoint's 16 steps and CFG 2 are not silently replaced by the 48-step defaults."""
    checkpoint = SamplerConfig(num_steps=16, guidance_scale=2.0, gumbel_temperature=(1.0, 0.0))
    fast = checkpoint.preset("fast")
    assert (fast.num_steps, fast.guidance_scale, fast.gumbel_temperature) == (16, 2.0, (1.0, 0.0))
    assert fast == SamplerConfig.preset("fast", base=checkpoint) and fast.reuse.interval == 4
    assert checkpoint.preset("fast", num_steps=12).num_steps == 12  # overrides still win
    assert SamplerConfig.preset("fast").num_steps == SamplerConfig().num_steps == 48  # the class call is unchanged
    assert SamplerConfig.preset("fast", checkpoint) == fast  # base by position, as before
    with pytest.raises(TypeError, match="base= only on the class"):
        checkpoint.preset("fast", base=SamplerConfig())


def _mgtq_imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) imports of mgtq modules in one file."""
    tree = ast.parse(path.read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("mgtq")}
    every = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("mgtq")}
    return top, every - top


def test_sampling_has_no_hidden_import_cycles():
    """All imports between sampling modules are at module level (a cycle would fail at import), and
    presets.py is data: it imports nothing from mgtq, so config → presets is one-way."""
    root = Path(mgtq.sampling.__file__).parent
    for path in sorted(root.rglob("*.py")):
        _, hidden = _mgtq_imports(path)
        assert not hidden, f"{path.name} imports {hidden} inside a function"
    top, _ = _mgtq_imports(root / "presets.py")
    assert not top


def test_config_round_trips_and_names_unknown_keys():
    config = SamplerConfig.preset("paper-combo", num_steps=12, guidance_scale=4.0)
    assert config.num_steps == 12 and config.guidance_scale == 4.0 and config.schedule == "cosine"
    assert config.noise.curve == "abs_cos" and config.noise.scale == 1.0 and config.momentum.order == 0
    assert config.differential.percent == 75 and config.zsampling.variant == "masked"
    assert config.zsampling.inversion_cfg == 0.0
    assert SamplerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert SamplerConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"noise\.scal"):
        SamplerConfig.from_dict({"noise": {"scal": 2}})
    with pytest.raises(ValueError, match="zigzag"):
        SamplerConfig.from_dict({"zigzag": {}})
    with pytest.raises(ValueError, match=r"differential\.z"):
        config.with_overrides({"differential.z": 50})
    assert config.with_overrides({"noise.scale": 2, "momentum.order": 2}).noise.scale == 2.0
    with pytest.raises(ValueError, match="preset"):
        SamplerConfig.preset("turbo")


@pytest.mark.parametrize("bad,match", [
    ({"differential": {"percent": 120}}, "differential.percent"),
    ({"zsampling": {"variant": "zigzag"}}, "zsampling.variant must be one of"),
    ({"zsampling": {"steps": [3, 9]}, "num_steps": 6}, "beyond the last step"),
    ({"momentum": {"order": 3}}, "momentum.order"),
    ({"noise": {"curve": "piecewise"}}, "knots"),
    ({"noise": {"scale": -1}}, "noise.scale"),
    ({"noise": "loud"}, "mapping"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig.from_dict(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        SamplerConfig(schedule="square")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="unknown key 'steps'"):
        SamplerConfig.from_dict({"steps": 3})
