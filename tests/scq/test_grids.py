"""Per-layer weight grids (group-wise A16, per-channel A8), the A8 set chosen before QAT when QAT needs
it, the measured-sensitivity selection, and A8 activations in the QAT loop."""

import copy

import pytest
import torch

from mgtq.quantization import FakeQuantLinear, linear_names
from mgtq.quantization.checkpoint import quantized_layers
from mgtq.quantization.selection import select_a8_layers
from mgtq.scq import qat, secondary
from mgtq.scq.calibrate import calibrate
from mgtq.scq.quantize import quantize_from_run
from mgtq.scq.recipe import MagnitudeConfig, QATConfig, Recipe, SecondaryConfig, load_recipe, recipe_from_dict
from mgtq.scq.run import RunFolder
from mgtq.scq.stages import stage_fingerprints
from mgtq.scq.synthesis import CalibrationData
from testkit import tiny_recipe_dict
from mgtq.files import read_json


GROUP = 16  # divides every in_features of the test-micro transformer (32 … 1312)


def _recipe(model_dir, **over) -> Recipe:
    return recipe_from_dict(tiny_recipe_dict(model_dir, **over))


def _data(transformer, n=4) -> CalibrationData:
    g = torch.Generator().manual_seed(0)
    return CalibrationData(tokens=torch.randint(0, transformer.config.codebook_size, (n, 16, 16), generator=g),
                           text=torch.randn(n, 16, 32, generator=g), pooled=torch.randn(n, 32, generator=g),
                           uncond_text=torch.zeros(1, 16, 32), uncond_pooled=torch.zeros(1, 32),
                           micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]]))


def test_optional_fields_at_their_default_keep_the_fingerprints_of_recipes_without_them():
    # Values computed by the code before qat.activations_in_loop / secondary.sensitivity_samples existed:
    # a run folder calibrated then stays complete under the same recipe.
    shipped = load_recipe(__import__("pathlib").Path(__file__).resolve().parents[2] / "recipes"
                          / "tiny-shapes-w4a8-scq.yaml")
    assert (shipped.section_fingerprint("qat"), shipped.section_fingerprint("secondary")) == \
        ("db4f8025d634f5f8", "0f7d39b810ec753c")
    assert Recipe().section_fingerprint("qat", "magnitudes", "secondary") == "3e466edbff599ef0"
    assert recipe_from_dict({"qat": {"activations_in_loop": True}}).section_fingerprint("qat") != \
        Recipe().section_fingerprint("qat")
    # and before synthesis.dtype / synthesis.keep_images existed
    assert (Recipe().section_fingerprint("prompts", "synthesis"), shipped.section_fingerprint("prompts", "synthesis")) \
        == ("fcb15437dac34a32", "5a8569e866a0c6d7")
    assert recipe_from_dict({"synthesis": {"keep_images": False}}).section_fingerprint("synthesis") != \
        Recipe().section_fingerprint("synthesis")


def test_qat_depends_on_the_a8_recipe_only_when_it_needs_the_a8_set():
    def qat_fp(**qat_over):
        base = {"qat": qat_over} if qat_over else {}
        one = recipe_from_dict({**base, "secondary": {"fraction": 0.25}})
        two = recipe_from_dict({**base, "secondary": {"fraction": 0.5}})
        return stage_fingerprints(one, "m")["qat"], stage_fingerprints(two, "m")["qat"]

    a, b = qat_fp()
    assert a == b  # per-channel everywhere, weights only: QAT is the same for any A8 set
    for over in ({"group_size": 64}, {"activations_in_loop": True}):
        a, b = qat_fp(**over)
        assert a != b


def test_sensitivity_ranks_layers_and_leaves_the_model_as_it_was(random_pipeline):
    model = copy.deepcopy(random_pipeline.transformer).float().eval()
    qat.prepare_fake_quant_(model, QATConfig(group_size=GROUP))
    names = linear_names(model)
    before = {n: model.get_submodule(n) for n in names}
    data = _data(model, n=2)
    damage = secondary.measure_a8_sensitivity(model, names, data, SecondaryConfig(sensitivity_samples=1),
                                              MagnitudeConfig(mask_ratios=(1.0,), batch_size=1),
                                              random_pipeline.settings.sampler, progress=False)
    # KL ≥ 0 up to float rounding (a random model's logits barely move)
    assert set(damage) == set(names) and all(v >= -1e-6 and v == v for v in damage.values())
    assert len(set(damage.values())) > 1  # a real measurement, not a constant
    assert all(model.get_submodule(n) is before[n] for n in names)
    assert all(model.get_submodule(n).activation_fake_quantizer is None for n in names)
    chosen = select_a8_layers(damage, 1 / 3, "sensitivity")
    k = round(len(names) / 3)
    assert chosen == sorted(sorted(names, key=lambda n: damage[n])[:k])


def test_prepare_fake_quant_puts_each_layer_on_its_export_grid(random_pipeline):
    model = copy.deepcopy(random_pipeline.transformer).float()
    a8 = linear_names(model)[:3]
    qat.prepare_fake_quant_(model, QATConfig(group_size=GROUP), a8, {n: 0.05 for n in a8})
    for name in linear_names(model):
        layer = model.get_submodule(name)
        assert isinstance(layer, FakeQuantLinear)
        if name in a8:
            assert layer.group_size == layer.in_features and float(layer.activation_fake_quantizer.scale) == pytest.approx(0.05)
        else:
            assert layer.group_size == GROUP and layer.activation_fake_quantizer is None


def test_groupwise_run_with_a8_in_the_loop_exports_the_grids_qat_trained(tmp_path, random_pipeline_dir):
    recipe = _recipe(random_pipeline_dir, qat={"group_size": GROUP, "activations_in_loop": True},
                     secondary={"selection": "sensitivity", "sensitivity_samples": 2})
    calibrate(recipe, tmp_path / "run", progress=False)
    run = RunFolder(tmp_path / "run")
    plan, chosen = read_json(run.a8_plan_file), read_json(run.selection_file)
    assert chosen["a8_layers"] == plan["a8_layers"] and chosen["chosen_before_qat"]
    assert len(plan["a8_layers"]) == round(len(plan["scores"]) / 3)
    assert plan["a8_layers"] == select_a8_layers(plan["scores"], 1 / 3, "sensitivity")
    assert set(plan["input_scales"]) == set(plan["a8_layers"])  # calibrated before QAT, for the loop
    assert run.stage_summary("qat")["activations_in_loop"] is True
    model, _ = quantize_from_run(run.root)
    layers = quantized_layers(model)
    for name, layer in layers.items():
        if name in plan["a8_layers"]:
            assert (layer.scheme, layer.group_size) == ("w4a8", None)
        else:
            assert layer.scheme == "w4a16" and layer.group_size in (GROUP, None)
    assert sum(layer.group_size == GROUP for layer in layers.values()) == len(layers) - len(plan["a8_layers"])


def test_sensitivity_after_qat_when_qat_does_not_need_the_a8_set(tmp_path, random_pipeline_dir):
    recipe = _recipe(random_pipeline_dir, qat={"steps": 2}, secondary={"selection": "sensitivity",
                                                                       "sensitivity_samples": 2})
    calibrate(recipe, tmp_path / "run", progress=False)
    run = RunFolder(tmp_path / "run")
    chosen = read_json(run.selection_file)
    assert not run.a8_plan_file.exists() and "chosen_before_qat" not in chosen
    assert chosen["a8_layers"] == select_a8_layers(chosen["sensitivity"], 1 / 3, "sensitivity")
    layers = quantized_layers(quantize_from_run(run.root)[0])
    assert {n for n, layer in layers.items() if layer.scheme == "w4a8"} == set(chosen["a8_layers"])
    assert all(layer.group_size is None for layer in layers.values())
