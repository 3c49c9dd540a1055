"""SCQ end to end on a small random pipeline: recipes, stages, resume, export → load, bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from mgtq.cli import main
from mgtq.quantization.checkpoint import FORMAT_VERSION
from mgtq.quantization.checkpoint import load as load_quantized_transformer
from mgtq.pipeline import MGTPipeline
from mgtq.quantization import W4A8Linear, W4Linear, prepare_qat_
from mgtq.scq import qat, stages
from mgtq.scq.calibrate import calibrate
from mgtq.scq.recipe import load_recipe, recipe_from_dict
from mgtq.scq.run import STAGES
from mgtq.scq.secondary import select_a8_layers
from mgtq.scq.synthesis import calibration_prompts
from mgtq.testing import tiny_recipe_dict
from mgtq.utils import read_json

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _recipe(model_dir, **over):
    data = tiny_recipe_dict(model_dir, synthesis={"num_steps": 3}, qat={"steps": 12})
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_pipeline_dir):
    out = tmp_path_factory.mktemp("scq") / "run"
    report = calibrate(_recipe(random_pipeline_dir), out, progress=False)
    return out, report


# --------------------------------------------------------------------------------------- recipes
def test_shipped_recipes_load():
    tiny = load_recipe(REPO / "recipes" / "tiny-shapes-w4a8-scq.yaml")
    assert tiny.qat.weight_bits == 4 and abs(tiny.secondary.fraction - 1 / 3) < 1e-9
    paper = load_recipe(REPO / "recipes" / "meissonic-1024-w4a8-scq.yaml")
    assert (paper.synthesis.num_steps, paper.synthesis.guidance_scale) == (64, 9.0)
    assert (paper.qat.lr, paper.qat.gradient_accumulation) == (5e-6, 32)


@pytest.mark.parametrize("bad,match", [
    ({"qat": {"lerning_rate": 1.0}}, "qat.*lerning_rate"),
    ({"secundary": {}}, "secundary"),
    ({"qat": {"weight_bits": 8}}, "weight_bits"),
    ({"secondary": {"selection": "highest"}}, "selection"),
    ({"magnitudes": {"statistic": "median"}}, "statistic"),
    ({"qat": {"objective": "mse"}}, "objective"),
])
def test_recipe_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        recipe_from_dict(bad)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("qat: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------ selection
def test_shapebench_calibration_prompts_are_not_the_scored_ones():
    from mgtq.shapes import shapebench_prompts

    recipe = recipe_from_dict({"prompts": {"source": "shapebench", "count": 40, "seed": 5}})
    pairs = calibration_prompts(recipe.prompts)
    assert [seed for _, seed in pairs] == list(range(5, 45))
    scored = [it.prompt for it in shapebench_prompts()]
    val = [it.prompt for it in shapebench_prompts(split="val")]
    assert {p for p, _ in pairs} <= set(val)
    assert [p for p, _ in pairs] != [p for p in scored[: len(pairs)]]


def test_a8_set_is_exactly_the_lowest_fraction():
    mags = {f"l{i}": float(v) for i, v in enumerate([5, 1, 9, 3, 7, 2, 8, 4, 6])}
    assert select_a8_layers(mags, 1 / 3, "lowest") == ["l1", "l3", "l5"]
    assert select_a8_layers(mags, 1.0, "all") == sorted(mags)
    rnd = select_a8_layers(mags, 1 / 3, "random", seed=1)
    assert len(rnd) == 3 and rnd == select_a8_layers(mags, 1 / 3, "random", seed=1)
    assert select_a8_layers(mags, 0.0, "lowest") == []


def test_run_selected_lowest_third_of_recorded_magnitudes(run):
    out, report = run
    mags = read_json(out / "magnitudes" / "magnitudes.json")["magnitude"]
    chosen = read_json(out / "secondary" / "selection.json")["a8_layers"]
    k = round(len(mags) / 3)
    assert len(chosen) == k == report["a8_layers"]
    threshold = max(mags[n] for n in chosen)
    assert all(mags[n] >= threshold for n in set(mags) - set(chosen))
    assert (out / "secondary" / "magnitudes.png").stat().st_size > 1000


def test_qat_lowers_the_loss(run):
    out, report = run
    before, after = report["qat_loss"]["loss_before"], report["qat_loss"]["loss_after"]
    assert after["ce"] < before["ce"]  # the recipe's objective is CE
    assert "kl_to_float" not in before  # CE keeps no float teacher in memory


def test_distillation_qat_moves_towards_the_float_model(tmp_path, random_pipeline_dir):
    report = calibrate(_recipe(random_pipeline_dir, qat={"objective": "distill", "lr": 1e-4}), tmp_path / "run", progress=False)
    before, after = report["qat_loss"]["loss_before"], report["qat_loss"]["loss_after"]
    assert before["kl_to_float"] > 0  # W4 changes the predictions; the KL is measured, not assumed
    assert after["kl_to_float"] < 0.8 * before["kl_to_float"], (before, after)
    assert read_json(tmp_path / "run" / "qat" / "stage.json")["objective"] == "distill"


def test_masked_distillation_loss_is_zero_only_for_the_teacher():
    from mgtq.training.objective import masked_distillation_loss

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 7, 3, 3, generator=g)
    mask = torch.rand(2, 3, 3, generator=g) < 0.5
    assert masked_distillation_loss(teacher, teacher, mask).abs() < 1e-6
    student = teacher.clone()
    student[~mask.unsqueeze(1).expand_as(student)] += 5  # unmasked positions do not count
    assert masked_distillation_loss(student, teacher, mask).abs() < 1e-6
    student[mask.unsqueeze(1).expand_as(student)] *= 2
    assert masked_distillation_loss(student, teacher, mask) > 1e-3


def test_synthesized_dataset_has_prompt_seed_image_tokens(run):
    from datasets import load_from_disk

    out, _ = run
    ds = load_from_disk(str(out / "synth" / "dataset"))
    assert set(ds.column_names) == {"prompt", "seed", "image", "tokens"}
    assert len(ds) == 8 and ds[0]["image"].size == (64, 64) and len(ds[0]["tokens"]) == 256
    assert ds["seed"] == list(range(8))


# --------------------------------------------------------------------------------------- resume
def test_rerun_skips_completed_stages(run, random_pipeline_dir):
    out, _ = run
    report = calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert [report[s] for s in STAGES] == ["skipped"] * 4


def test_changed_section_reruns_that_stage_and_after(tmp_path, run, random_pipeline_dir):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    changed = _recipe(random_pipeline_dir, secondary={"selection": "all"})
    with pytest.raises(ValueError, match=r"another recipe .*secondary\.selection.*--restart"):
        calibrate(changed, copy, progress=False)  # a run folder keeps its recipe unless told to start over
    report = calibrate(changed, copy, progress=False, restart=True)
    assert [report[s] for s in STAGES] == ["skipped", "skipped", "skipped", "ran"]
    assert report["a8_layers"] == len(read_json(copy / "magnitudes" / "magnitudes.json")["magnitude"])


def test_resume_after_interrupted_qat(tmp_path, random_pipeline_dir, monkeypatch):
    out = tmp_path / "run"
    real_loss, calls = qat.qat_loss, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # count training steps, not the no-grad evaluations
        if calls["n"] == 9:  # interrupted in the 9th training step, after the state of step 8 was saved
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(qat, "qat_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert not (out / "qat").exists()  # nothing half-written
    assert read_json(out / "qat-state" / "trainer.json")["step"] == 8
    monkeypatch.setattr(qat, "qat_loss", real_loss)
    report = calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert report["synth"] == "skipped" and report["qat"] == "ran"
    assert read_json(out / "qat" / "stage.json")["steps"] == 12


def test_nan_loss_stops_with_clear_error_and_keeps_state(tmp_path, random_pipeline_dir, monkeypatch):
    out = tmp_path / "run"
    real_loss, calls = qat.qat_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # count training steps, not the no-grad evaluations
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(qat, "qat_loss", poisoned)
    with pytest.raises(FloatingPointError, match="last good state"):
        calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert read_json(out / "qat-state" / "trainer.json")["step"] == 4
    assert not (out / "qat").exists()


def test_damaged_calibration_state_is_detected(tmp_path, run, random_pipeline_dir):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "magnitudes" / "stage.json").write_text("{truncated")  # damaged marker → the stage runs again
    report = calibrate(_recipe(random_pipeline_dir), copy, progress=False)
    assert report["magnitudes"] == "ran"
    shutil.rmtree(copy / "synth" / "dataset")
    (copy / "synth" / "dataset").mkdir()  # its files no longer those the stage recorded → it runs again
    report = calibrate(_recipe(random_pipeline_dir), copy, progress=False)
    assert report["synth"] == "ran" and len(stages.RunFolder(copy).load_dataset()) == 8


# --------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(tmp_path_factory, run):
    out, _ = run
    ckpt = tmp_path_factory.mktemp("ckpt") / "w4a8"
    assert main(["export", str(out), "--out", str(ckpt)]) == 0
    return ckpt


def test_export_is_packed_safetensors_with_manifest(exported, run):
    manifest = read_json(exported / "transformer" / "manifest.json")
    assert manifest["format_version"] == FORMAT_VERSION
    schemes = [v["scheme"] for v in manifest["layers"].values()]
    a8 = read_json(run[0] / "secondary" / "selection.json")["a8_layers"]
    assert schemes.count("w4a8") == len(a8) and schemes.count("w4a16") == len(schemes) - len(a8)
    assert "group_size" not in manifest and manifest["recipe"] == load_recipe(run[0] / "recipe.yaml").to_dict()
    assert manifest["selection"]["mode"] == "lowest" and manifest["float_dtype"] == "float32"
    assert not list(exported.rglob("*.bin")) and not list(exported.rglob("*.pt"))
    from safetensors import safe_open

    with safe_open(str(exported / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        name = next(iter(manifest["layers"]))
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.uint8


def test_export_load_same_logits_as_calibrated_model(exported, run):
    out, _ = run
    recipe = load_recipe_from_run(out)
    sel = read_json(out / "secondary" / "selection.json")
    from mgtq.models import MeissonicTransformer

    fake = MeissonicTransformer.from_pretrained(out / "qat" / "transformer").eval()
    prepare_qat_(fake, group_size=recipe.qat.group_size, a8_layers=sel["a8_layers"], input_scales=sel["input_scales"])
    real = load_quantized_transformer(exported / "transformer")
    assert sum(isinstance(m, W4A8Linear) for m in real.modules()) == len(sel["a8_layers"])
    assert sum(isinstance(m, (W4Linear, W4A8Linear)) for m in real.modules()) == len(read_json(
        exported / "transformer" / "manifest.json")["layers"])
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randint(0, 33, (2, 16, 16), generator=gen),
                  encoder_hidden_states=torch.randn(2, 16, 32, generator=gen), pooled_projections=torch.randn(2, 32, generator=gen),
                  timestep=torch.tensor([0.3, 0.9]))
    with torch.no_grad():
        a, b = fake(**kwargs), real(**kwargs)
    assert (a - b).abs().max().item() < 1e-3 * max(1.0, a.abs().max().item())


def load_recipe_from_run(out):
    return recipe_from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))


def test_quantized_checkpoint_generates_through_load_and_cli(exported, tmp_path):
    import mgtq

    pipe = mgtq.load(exported)
    assert isinstance(pipe, MGTPipeline)
    out = pipe("a red circle", seed=0, progress=False)
    assert out.images[0].size == (64, 64)
    assert main(["generate", "--model", str(exported), "--prompt", "a red circle", "--steps", "3",
                 "--out", str(tmp_path / "q.png"), "--no-progress", "--device", "cpu"]) == 0


def test_unknown_format_version_is_clear_error(tmp_path, exported):
    copy = tmp_path / "ckpt"
    shutil.copytree(exported, copy)
    manifest = read_json(copy / "transformer" / "manifest.json")
    manifest["format_version"] = 99
    (copy / "transformer" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        load_quantized_transformer(copy / "transformer")


def test_tampered_safetensors_is_clear_error(tmp_path, exported):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "ckpt"
    shutil.copytree(exported, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("weight_packed"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="sha256"):  # shapes, dtypes, values: tests/quantization/test_checkpoint.py
        load_quantized_transformer(copy / "transformer")
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match="sha256"):
        load_quantized_transformer(copy / "transformer")


def test_export_of_unfinished_run_is_clear_error(tmp_path, run):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    shutil.rmtree(copy / "secondary")
    assert main(["export", str(copy), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_accelerate_launch_and_torchrun_give_the_same_artifacts(tmp_path, random_pipeline_dir, run):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(random_pipeline_dir, qat={"steps": 4}).to_dict()))
    layouts = {}
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "-m", "mgtq.cli", "calibrate"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mgtq.cli",
                     "calibrate"],
    }
    for name, cmd in commands.items():
        out = tmp_path / name
        proc = subprocess.run(cmd + ["--recipe", str(recipe), "--out", str(out), "--no-progress"],
                              env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        layouts[name] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if "qat-state" not in str(p))
    assert layouts["accelerate"] == layouts["torchrun"]
    assert read_json(tmp_path / "torchrun" / "qat" / "stage.json")["processes"] == 2
