"""mgtq.quantize_: one entry point, frozen validated configs, fnmatch overrides, activation calibration."""

import copy
import json

import pytest
import torch

import mgtq
from mgtq.export import write_checkpoint
from mgtq.models.presets import build_transformer
from mgtq.quantization import (SCQConfig, W4A8Config, W4A8Linear, W4A16Config, W4Linear, calibrate_activations,
                               checkpoint, linear_names, quantize_)
from testkit import micro_forward_inputs


def micro():
    torch.manual_seed(0)
    return build_transformer("test-micro").eval()


@pytest.mark.parametrize("build, match", [
    (lambda: W4A16Config(group_size=3), "group_size"),
    (lambda: W4A16Config(group_size=0), r"W4A16Config.group_size must be None \(one scale per output channel\)"),
    (lambda: SCQConfig(group_size=-2), r"SCQConfig.group_size must be None .* even integer ≥ 2 .*got -2"),
    (lambda: W4A16Config(group_size=True), "group_size"),
    (lambda: W4A8Config(scale_method="max"), "scale_method"),
    (lambda: W4A8Config(scale_method="percentile", percentile=0), "percentile"),
    (lambda: SCQConfig(fraction=1.5), "fraction"),
    (lambda: SCQConfig(selection="sensitivity"), "selection"),
])
def test_configs_are_validated_when_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        W4A16Config().group_size = 64


def test_w4a16_quantizes_every_linear_with_its_group_size():
    model = micro()
    names = linear_names(model)
    done = quantize_(model, W4A16Config(group_size=32))
    assert sorted(done) == sorted(names) and set(done.values()) == {"W4Linear"}
    assert all(model.get_submodule(n).group_size == 32 for n in names)


def test_overrides_by_pattern_first_match_wins_and_none_keeps_float():
    model = micro()
    names = linear_names(model)
    first_block = [n for n in names if n.startswith("transformer_blocks.0.")]
    done = quantize_(model, W4A16Config(), overrides={"transformer_blocks.0.*": None, "*": W4A16Config(group_size=16)})
    assert not set(first_block) & set(done)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in first_block)
    assert all(model.get_submodule(n).group_size == 16 for n in done)


def test_equal_configs_written_separately_quantize_every_layer_they_name():
    model = micro()
    a, b, rest = linear_names(model)[:3]
    done = quantize_(model, W4A16Config(), overrides={a: W4A8Config(), b: W4A8Config()}, input_scales={a: 0.1, b: 0.1})
    assert done[a] == done[b] == "W4A8Linear" and done[rest] == "W4Linear"
    assert sorted(done) == sorted(linear_names(micro()))  # none left float


def test_unknown_pattern_and_wrong_config_type_fail_before_any_change():
    model = micro()
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        quantize_(model, W4A16Config(), overrides={"no_such_layer.*": None})
    with pytest.raises(TypeError, match="W4A16Config, W4A8Config or SCQConfig"):
        quantize_(model, {"group_size": 64})
    with pytest.raises(ValueError, match="calibration_prompts"):
        quantize_(model, W4A8Config())
    assert not any(isinstance(m, (W4Linear, W4A8Linear)) for m in model.modules())


def test_w4a8_scales_come_from_the_calibration_context():
    model = micro()
    inputs = micro_forward_inputs(model)
    with torch.no_grad(), calibrate_activations(model) as stats:
        model(**inputs)
    done = quantize_(model, W4A8Config(), activation_stats=stats)
    assert set(done.values()) == {"W4A8Linear"}
    for name in done:
        assert float(model.get_submodule(name).input_scale) == pytest.approx(float(stats[name].int8_scale()))


def test_scq_gives_a8_to_the_lowest_magnitude_fraction():
    model = micro()
    with torch.no_grad(), calibrate_activations(model) as stats:
        model(**micro_forward_inputs(model))
    names = linear_names(model)
    done = quantize_(model, SCQConfig(fraction=0.25, group_size=16), activation_stats=stats)
    a8 = sorted(n for n, kind in done.items() if kind == "W4A8Linear")
    lowest = sorted(sorted(names, key=lambda n: (stats[n].mean_abs, n))[:round(0.25 * len(names))])
    assert a8 == lowest
    assert all(model.get_submodule(n).group_size == 16 for n, kind in done.items() if kind == "W4Linear")


def test_calibration_prompts_run_the_pipeline(random_pipeline):
    pipe = type(random_pipeline)(**random_pipeline.components)  # the modules and a copy of the settings
    pipe.transformer = copy.deepcopy(random_pipeline.transformer)
    done = quantize_(pipe, W4A8Config(), calibration_prompts=["a red circle", "two blue squares"])
    assert set(done.values()) == {"W4A8Linear"}
    assert pipe("a red circle", seed=0, progress=False, output_type="latent").tokens.shape == (1, 16, 16)
    with pytest.raises(TypeError, match="need a pipeline"):
        quantize_(micro(), W4A8Config(), calibration_prompts=["a red circle"])


def test_save_pretrained_writes_the_bytes_export_writes(random_pipeline, random_pipeline_dir, tmp_path):
    pipe = type(random_pipeline)(**random_pipeline.components)  # the modules and a copy of the settings
    pipe.transformer = copy.deepcopy(random_pipeline.transformer)
    quantize_(pipe, W4A16Config(group_size=16))
    pipe.save_pretrained(tmp_path / "saved", progress=False)
    write_checkpoint(random_pipeline_dir, pipe.transformer, checkpoint.describe(pipe.transformer),
                     tmp_path / "exported")
    for name in ("config.json", "manifest.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "saved/transformer" / name).read_bytes() == (tmp_path / "exported/transformer" / name).read_bytes()
    config = json.loads((tmp_path / "saved/transformer/config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "mgtq", "format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION,
                      "weight_bits": 4, "schemes": ["w4a16-g16"], "manifest": "manifest.json"}
    kwargs = dict(prompt="a red circle", seed=1, progress=False, output_type="latent")
    assert torch.equal(mgtq.load(tmp_path / "saved", progress=False)(**kwargs).tokens, pipe(**kwargs).tokens)


def test_folder_that_claims_mgtq_without_manifest_is_refused(tmp_path, random_pipeline):
    model = copy.deepcopy(random_pipeline.transformer)
    quantize_(model, W4A16Config())
    model.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "manifest.json").unlink()
    from mgtq.models import MeissonicTransformer

    with pytest.raises(ValueError, match="manifest.json is missing"):
        MeissonicTransformer.from_pretrained(tmp_path / "t")
