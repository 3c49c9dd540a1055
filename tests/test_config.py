"""mgtq.config: strict typed loading of config dataclasses."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from mgtq.config import from_mapping, read_mapping, validate


@dataclass(frozen=True)
class Inner:
    fraction: float = 0.5
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    steps: int = 3
    lr: float = 1e-4
    group: int | None = None
    ratios: tuple[float, ...] = (0.5,)
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"qat.steps must be ≥ 0, got {self.steps}")


@pytest.mark.parametrize("data, message", [
    ({"steps": "many"}, "qat.steps must be an integer, got 'many'"),
    ({"steps": 2.5}, "qat.steps must be an integer, got 2.5"),
    ({"steps": True}, "qat.steps must be an integer"),
    ({"lr": float("nan")}, "qat.lr must be a finite number"),
    ({"lr": "fast"}, "qat.lr must be a number, got 'fast'"),
    ({"ratios": 0.5}, "qat.ratios must be a list, got 0.5"),
    ({"ratios": [0.5, "x"]}, "qat.ratios[1] must be a number"),
    ({"flag": "yes"}, "qat.flag must be true or false"),
    ({"inner": {"mode": "c"}}, "qat.inner.mode must be one of ['a', 'b']"),
    ({"inner": {"typo": 1}}, "unknown key 'qat.inner.typo'"),
    ({"stpes": 1}, "unknown key 'qat.stpes'"),
    ({"steps": -1}, "qat.steps must be ≥ 0"),
    ({"group": "abc"}, "qat.group must be an integer"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        from_mapping(Outer, data, "qat")


def test_values_are_normalized():
    cfg = from_mapping(Outer, {"lr": "1e-4", "ratios": [1, 0.25], "group": None, "inner": {"fraction": 1}}, "qat")
    assert cfg.lr == 1e-4 and cfg.ratios == (1.0, 0.25) and isinstance(cfg.inner, Inner) and cfg.inner.fraction == 1.0
    with pytest.raises(ValueError, match="must be a mapping"):
        from_mapping(Outer, [1, 2], "qat")


@dataclass(frozen=True)
class _Section:
    steps: int = 3


@dataclass(frozen=True)
class _Validated:
    scale: float = 1
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = ()
    section: _Section = field(default_factory=_Section)

    def __post_init__(self):
        validate(self, "cfg")


def test_validate_holds_python_built_configs_to_the_file_rules():
    built = _Validated(scale=2, sizes=[1, 2], section={"steps": 4})
    assert built == _Validated(scale=2.0, sizes=(1, 2), section=_Section(4))
    assert isinstance(built.scale, float) and isinstance(built.sizes, tuple)
    for kwargs, message in [({"scale": "big"}, "cfg.scale must be a number"), ({"mode": "c"}, "cfg.mode must be one of"),
                            ({"section": {"steps": 1.5}}, "cfg.section.steps must be an integer"),
                            ({"section": {"stesp": 1}}, "unknown key 'cfg.section.stesp'")]:
        with pytest.raises(ValueError, match=message):
            _Validated(**kwargs)


def test_a_quoted_number_is_a_number_in_file_data_only():
    assert from_mapping(Outer, {"lr": "1e-4"}, "qat").lr == 1e-4 and from_mapping(Outer, {"lr": "0.5"}).lr == 0.5
    assert _Validated(section={"steps": 4}, scale=2).scale == 2.0
    with pytest.raises(ValueError, match="cfg.scale must be a number, got '0.5'"):
        _Validated(scale="0.5")  # built in Python: a string is not a number
    with pytest.raises(ValueError, match="qat.lr must be a number"):
        from_mapping(Outer, {"lr": "fast"}, "qat")


def _every_config():
    """(config class, bad keyword arguments, what the message names) for each config dataclass of mgtq."""
    from mgtq.merging.patch import TomeConfig
    from mgtq.pipeline import PipelineSettings
    from mgtq.quantization.api import SCQConfig, W4A8Config, W4A16Config
    from mgtq.quantization.checkpoint import LayerScheme, Manifest
    from mgtq.sampling.config import SamplerConfig
    from mgtq.scq.recipe import Recipe
    from mgtq.shapes.scorer import ScorerConfig
    from mgtq.training.loop import LoopSettings
    from mgtq.training.mgt import MGTTrainConfig
    from mgtq.training.train_vq import VQTrainConfig
    from mgtq.vq import VQConfig

    return [
        (Recipe, {"qat": {"steps": "300"}}, "qat.steps must be an integer"),
        (SamplerConfig, {"noise": {"curve": "loud"}}, "noise.curve must be one of"),
        (TomeConfig, {"sources": "most"}, "TomeConfig.sources must be one of"),
        (TomeConfig, {"ratio": "0.5"}, "TomeConfig.ratio must be a number"),
        (W4A16Config, {"group_size": "64"}, "W4A16Config.group_size must be an integer"),
        (W4A8Config, {"scale_method": "max"}, "W4A8Config.scale_method must be one of"),
        (SCQConfig, {"selection": "highest"}, "SCQConfig.selection must be one of"),
        (LayerScheme, {"scheme": "w3a8"}, "layer.scheme must be one of"),
        (Manifest, {"layers": {"a": LayerScheme("w4a16")}, "float_dtype": "int8"}, "manifest.float_dtype must be one of"),
        (PipelineSettings, {"image_range": "0-1"}, "mgtq.image_range must be one of"),
        (ScorerConfig, {"allow_extra_objects": 1}, "scorer.allow_extra_objects must be true or false"),
        (LoopSettings, {"steps": 6.0, "save_every": 2}, "loop.steps must be an integer"),
        (MGTTrainConfig, {"category_weights": {"counting": "many"}}, r"category_weights.counting must be a number"),
        (VQTrainConfig, {"model": {"latent_channels": "8"}}, "model.latent_channels must be an integer"),
        (VQTrainConfig, {"mixed_precision": "fp16"}, "mixed_precision must be one of"),
        (VQConfig, {"block_out_channels": [16, "32"]}, r"block_out_channels\[1\] must be an integer"),
    ]


@pytest.mark.parametrize("cls, bad, message", _every_config(), ids=lambda v: getattr(v, "__name__", None))
def test_every_config_dataclass_checks_its_fields_when_built_in_python(cls, bad, message):
    with pytest.raises(ValueError, match=message):
        cls(**bad)


def test_read_mapping_wants_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "ok.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list.yaml must hold a mapping"):
        read_mapping(tmp_path / "list.yaml")
    assert read_mapping(tmp_path / "empty.yaml") == {}
    assert read_mapping(tmp_path / "ok.json") == {"a": 1}
