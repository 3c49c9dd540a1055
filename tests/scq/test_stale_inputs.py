"""Stale or edited inputs are never reused: every input a stage reads is in its fingerprint, and export
re-checks the source model and each stage's files against what the run recorded."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mgtq.cli import main
from mgtq.scq.calibrate import calibrate
from mgtq.scq.recipe import recipe_from_dict
from mgtq.scq.run import STAGES
from testkit import tiny_recipe_dict


@pytest.fixture(scope="module")
def finished(tmp_path_factory, random_pipeline_dir):
    """A folder with a source model, a prompts file and a finished run, all named relatively to it."""
    root = tmp_path_factory.mktemp("stale")
    shutil.copytree(random_pipeline_dir, root / "model")
    index = json.loads((root / "model" / "model_index.json").read_text())
    index.pop("mgtq_files")  # a source model its owner edits (its files are not pinned, as an official folder's)
    (root / "model" / "model_index.json").write_text(json.dumps(index))
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        calibrate(_recipe(), "run", progress=False)
    finally:
        os.chdir(cwd)
    return root


def _recipe():
    return recipe_from_dict(tiny_recipe_dict("model", prompts={"source": "file", "file": "prompts.txt", "count": 4}))


@pytest.fixture
def work(finished, tmp_path, monkeypatch):
    """A copy of `finished` as the working folder, so a test may edit anything in it."""
    shutil.copytree(finished, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return Path("model"), Path("prompts.txt"), Path("run")


def _scale(path, key_part, factor):
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if key_part in k and tensors[k].is_floating_point())
    tensors[key] = tensors[key] * factor
    save_file(tensors, path)


def _edit_prompts(model, prompts):
    prompts.write_text("a green triangle\na blue square\n")


def _edit_text_encoder(model, prompts):
    _scale(model / "text_encoder" / "model.safetensors", "final_layer_norm", 1.5)


def _edit_sampler_settings(model, prompts):
    index = json.loads((model / "model_index.json").read_text())
    index["mgtq"]["sampler"]["gumbel_temperature"] = [0.5, 0.0]
    (model / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("edit", [_edit_prompts, _edit_text_encoder, _edit_sampler_settings],
                         ids=["prompts-file", "text-encoder", "sampler-settings"])
def test_an_edited_input_reruns_every_stage_and_stale_export_is_refused(work, edit, capsys):
    model, prompts, run = work
    assert [calibrate(_recipe(), run, progress=False)[s] for s in STAGES] == ["skipped"] * 4  # unedited: reused
    edit(model, prompts)
    assert main(["export", str(run), "--out", "ckpt"]) == 2
    err = capsys.readouterr().err
    assert f"stage 'synth' of {run} was computed from other inputs than today's" in err
    assert f"rerun `mgtq calibrate --recipe {run / 'recipe.yaml'} --out {run}`" in err
    assert not Path("ckpt").exists()
    report = calibrate(_recipe(), run, progress=False)
    assert [report[s] for s in STAGES] == ["ran"] * 4


def test_edited_qat_weights_in_the_run_are_refused_by_export_and_rerun_by_calibrate(work, capsys):
    model, prompts, run = work
    _scale(run / "qat" / "transformer" / "diffusion_pytorch_model.safetensors", "", 100.0)
    assert main(["export", str(run), "--out", "ckpt"]) == 2
    assert f"stage 'qat' of {run}: the files in {run / 'qat'} changed since the stage wrote it" in capsys.readouterr().err
    report = calibrate(_recipe(), run, progress=False)
    assert report["qat"] == "ran"  # recomputed as it was (QAT is deterministic), so the later stages stand
    assert main(["export", str(run), "--out", "ckpt"]) == 0


@pytest.mark.parametrize("stage,file,text", [
    ("secondary", "selection.json", '{"selection": "lowest"}'),
    ("qat", "transformer/config.json", '{"num_layers": "two"}'),
    ("magnitudes", "magnitudes.json", "[]"),
])
def test_an_edited_stage_file_is_refused_by_export_naming_the_stage(work, stage, file, text, capsys):
    model, prompts, run = work
    (run / stage / file).write_text(text)
    assert main(["export", str(run), "--out", "ckpt"]) == 2
    assert f"stage {stage!r} of {run}: the files in {run / stage} changed" in capsys.readouterr().err
    assert not Path("ckpt").exists()


def test_a_run_record_of_the_wrong_shape_is_one_line(work, capsys):
    model, prompts, run = work
    (run / "run.json").write_text('{"model": "model", "fingerprints": []}')
    assert main(["export", str(run), "--out", "ckpt"]) == 2
    assert f"{run / 'run.json'} is not an mgtq run record" in capsys.readouterr().err


def test_export_copies_the_recipes_model_not_another_folder_run_json_names(work):
    model, prompts, run = work
    elsewhere = Path("elsewhere")
    shutil.copytree(model, elsewhere)
    (elsewhere / "tokenizer" / "extra.txt").write_text("not the source model's")
    info = json.loads((run / "run.json").read_text())
    info["model"] = str(elsewhere)
    (run / "run.json").write_text(json.dumps(info))
    assert main(["export", str(run), "--out", "ckpt"]) == 0
    assert not Path("ckpt/tokenizer/extra.txt").exists()
    manifest = json.loads(Path("ckpt/transformer/manifest.json").read_text())
    assert manifest["source_model"] == str(model)
