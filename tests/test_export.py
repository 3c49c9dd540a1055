"""`mgtq export` writes only where it may (checked before any work), with the run's own recipe in its hints."""

import json
import shutil

import pytest

from mgtq.cli import main
from mgtq.export import check_target, export_run, is_checkpoint, write_checkpoint
from mgtq.quantization import checkpoint
from testkit import random_quantized_pipeline

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def run(tmp_path, random_pipeline_dir):
    """A calibration run folder whose stages never ran (export must refuse it, or refuse its target)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(REPO / "recipes" / "tiny-shapes-w4a8-scq.yaml", run / "recipe.yaml")
    stages = ("synth", "qat", "magnitudes", "secondary")
    (run / "run.json").write_text(json.dumps({"model": str(random_pipeline_dir),
                                              "fingerprints": dict.fromkeys(stages, "0" * 16)}))
    return run


@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory, random_pipeline_dir):
    pipe = random_quantized_pipeline()
    manifest = checkpoint.describe(pipe.transformer)
    return write_checkpoint(random_pipeline_dir, pipe.transformer, manifest, tmp_path_factory.mktemp("c") / "ckpt")


def _snapshot(path):
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target,match", [
    ("run", "overlaps the calibration run"),
    ("run/inside", "overlaps the calibration run"),
    ("source", "overlaps the run's source model"),
    ("folder", "existing folder that is not an mgtq checkpoint"),
    ("file", "existing file that is not an mgtq checkpoint"),
])
def test_export_refuses_what_it_did_not_write_and_touches_nothing(target, match, run, random_pipeline_dir, tmp_path,
                                                                   capsys):
    paths = {"run": run, "run/inside": run / "inside", "source": random_pipeline_dir, "folder": tmp_path / "mine",
             "file": tmp_path / "notes.txt"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"precious")
    (tmp_path / "notes.txt").write_text("precious")
    out = paths[target]
    before = {p: _snapshot(p) for p in (run, random_pipeline_dir, tmp_path / "mine", tmp_path / "notes.txt")}
    with pytest.raises(ValueError, match=match):
        check_target(run, out)
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    # The CLI's own path check may refuse a file first ("is a file; give a folder path"): either way, one line.
    assert "\n" not in err and (match in err or (target == "file" and "is a file" in err))
    assert {p: _snapshot(p) for p in before} == before
    assert not (run / "inside").exists()


def test_an_output_path_under_a_file_is_refused(run, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_target(run, tmp_path / "notes.txt" / "ckpt")


def test_an_existing_checkpoint_needs_overwrite(run, a_checkpoint):
    assert is_checkpoint(a_checkpoint)
    with pytest.raises(ValueError, match="pass --overwrite"):
        check_target(run, a_checkpoint)
    check_target(run, a_checkpoint, overwrite=True)  # allowed: the unfinished run is what fails next
    with pytest.raises(ValueError, match="not complete"):
        export_run(run, a_checkpoint, overwrite=True)
    assert is_checkpoint(a_checkpoint)


def test_overwrite_checks_up_front_that_the_checkpoint_can_be_swapped(run, a_checkpoint, monkeypatch):
    # export's --overwrite writes the new checkpoint beside the old one and swaps them, as quantize's does: an
    # unwritable parent (or a mount point) is refused before the minutes of quantizing, as quantize refused it
    import os

    real_access = os.access
    parent = str(a_checkpoint.resolve().parent)
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and str(p) != parent)
    with pytest.raises(ValueError, match="is replaced by a folder written beside it"):
        check_target(run, a_checkpoint, overwrite=True)
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(a_checkpoint.resolve()))
    monkeypatch.setattr(os, "access", real_access)
    with pytest.raises(ValueError, match="is a mount point"):
        check_target(run, a_checkpoint, overwrite=True)


def test_a_checkpoint_without_manifest_is_not_overwritten(run, a_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(a_checkpoint, broken)
    (broken / "transformer" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not an mgtq checkpoint"):
        check_target(run, broken, overwrite=True)


def test_unfinished_run_hint_names_the_runs_own_recipe(run, tmp_path):
    with pytest.raises(ValueError, match=f"mgtq calibrate --recipe {run / 'recipe.yaml'} --out {run}"):
        export_run(run, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------ links in the source model
@pytest.fixture
def source_copy(random_pipeline_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(random_pipeline_dir, source)
    return source


def _write(source, out):
    pipe = random_quantized_pipeline()
    manifest = checkpoint.describe(pipe.transformer)
    return write_checkpoint(source, pipe.transformer, manifest, out)


def test_a_link_out_of_the_source_model_is_refused_and_its_target_not_copied(source_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the model")
    (source_copy / "tokenizer" / "extra.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"tokenizer/extra.txt is a symbolic link to .*secret.txt, outside the model"):
        _write(source_copy, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt", "source"]  # no checkpoint, no debris


def test_a_link_loop_in_the_source_model_is_refused_not_recursed(source_copy, tmp_path):
    (source_copy / "vqvae" / "loop").symlink_to("..")
    with pytest.raises(ValueError, match=r"vqvae/loop is a symbolic link to .*, not a file"):
        _write(source_copy, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_a_link_to_a_file_inside_the_source_model_is_copied_as_a_file(source_copy, tmp_path):
    (source_copy / "tokenizer" / "copy.json").symlink_to(source_copy / "tokenizer" / "tokenizer_config.json")
    out = _write(source_copy, tmp_path / "ckpt")
    copied = out / "tokenizer" / "copy.json"
    assert not copied.is_symlink() and copied.read_bytes() == (source_copy / "tokenizer" / "tokenizer_config.json").read_bytes()


def test_overwriting_a_symlinked_out_keeps_the_link(a_checkpoint, source_copy, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(a_checkpoint, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    _write(source_copy, link)
    assert link.is_symlink() and is_checkpoint(real)


def test_overwriting_a_checkpoint_keeps_the_users_files_in_it(a_checkpoint, source_copy, tmp_path):
    out = shutil.copytree(a_checkpoint, tmp_path / "repo")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "notes.md").write_text("my notes")  # a file the source model does not have
    _write(source_copy, out)  # mgtq export --overwrite: one swap of the whole folder
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (out / "notes.md").read_text() == "my notes"
    assert is_checkpoint(out)


def test_an_out_inside_a_pipelines_component_folder_is_refused_beside_it_not(tmp_path):
    from mgtq.export import check_no_overlap

    pipeline = tmp_path / "clone"
    (pipeline / "vqvae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="is inside .*vqvae, a component folder of a pipeline"):
        check_no_overlap(pipeline / "vqvae" / "q", {})  # the vqvae's checksums and loads would meet its files
    check_no_overlap(pipeline / "exports" / "q", {})  # beside the components: a load never reads there
    check_no_overlap(tmp_path / "q", {"the source model": pipeline})
