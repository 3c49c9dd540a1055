"""The calibration run folder: one `mgtq calibrate` at a time, one recipe per folder, no debris."""

import os

import pytest

from mgtq.cli import main
from mgtq.scq.recipe import dump_recipe, recipe_from_dict
from mgtq.scq.run import RunFolder, RunFolderBusy
from mgtq.utils import recover_atomic_target


def test_a_second_calibrate_on_a_held_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_recipe(recipe_from_dict({"model": str(tmp_path / "no-such-model")})))
    with run.lock():
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()} on .* since "):
            with RunFolder(run.root).lock():
                pass
        # The lock is taken before the model is looked at: nothing else is tried or written.
        (tmp_path / "no-such-model").mkdir()
        assert main(["calibrate", "--recipe", str(recipe), "--out", str(run.root)]) == 2
        assert f"is in use by pid {os.getpid()} on " in capsys.readouterr().err
        assert sorted(p.name for p in run.root.iterdir()) == [".lock"]
    with RunFolder(run.root).lock():  # released with its holder
        pass


def test_a_run_folder_keeps_its_recipe_unless_restarted(tmp_path):
    run = RunFolder(tmp_path / "run")
    first, second = recipe_from_dict({"qat": {"steps": 3}}), recipe_from_dict({"qat": {"steps": 4}})
    run.start(first, tmp_path, {"synth": "x"})
    run.start(first, tmp_path, {"synth": "x"})  # the same recipe resumes
    with pytest.raises(ValueError, match=r"another recipe .*differs in qat\.steps.*--restart"):
        run.start(second, tmp_path, {"synth": "x"})
    assert run.recipe() == first
    run.start(second, tmp_path, {"synth": "x"}, restart=True)
    assert run.recipe() == second


def test_debris_of_killed_writes_is_cleaned_and_the_last_copy_restored(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    # killed between the two renames of a swap: only the old copy is left, under its hidden name
    # (debris names as mgtq's writers give them: `.NAME.tmp-PID-XXXXXXXX`, `.NAME.old-PID-XXXXXXXX`)
    (run.root / ".qat-state.old-1234-0000aaaa").mkdir()
    (run.root / ".qat-state.old-1234-0000aaaa" / "trainer.json").write_text("{}")
    (run.root / ".qat-state.tmp-1234-0000bbbb").mkdir()  # the new copy, maybe incomplete
    (run.root / "synth").mkdir()
    (run.root / ".synth.old-5678-0000cccc").mkdir()  # killed while deleting the replaced copy
    (run.root / ".recipe.yaml.tmp-1234-0000dddd.yaml").write_text("half")  # atomic_write_text's temporary file
    (run.root / ".user-notes").write_text("mine")  # not ours: kept
    (run.root / ".recipe.yaml.swp").write_text("an editor's")  # looks like debris, is not mgtq's: kept
    run.start(recipe_from_dict({}), tmp_path, {})
    assert (run.qat_state / "trainer.json").read_text() == "{}"
    assert sorted(p.name for p in run.root.iterdir() if p.name.startswith(".")) == [".recipe.yaml.swp", ".user-notes"]


def test_recover_atomic_target_leaves_a_clean_folder_alone(tmp_path):
    (tmp_path / "x").mkdir()
    recover_atomic_target(tmp_path / "x")
    recover_atomic_target(tmp_path / "missing" / "y")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_unfinished_run_hint_names_the_runs_own_recipe(tmp_path):
    run = tmp_path / "run"
    recipe = recipe_from_dict({"model": str(tmp_path), "qat": {"steps": 0}})
    RunFolder(run).start(recipe, tmp_path, {"synth": "x", "qat": "y", "magnitudes": "z", "secondary": "w"})
    with pytest.raises(ValueError, match=f"stage 'synth' of {run} is not complete; run `mgtq calibrate --recipe "
                                         f"{run / 'recipe.yaml'} --out {run}`"):
        RunFolder(run).check_finished()


def _user_folder(root):
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "synth").mkdir()
    (root / "synth" / "important.txt").write_text("mine")
    (root / "qat").mkdir()
    (root / "qat" / "model-notes.txt").write_text("mine")
    (root / ".recipe.yaml.swp").write_text("mine")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_calibrate_refuses_a_folder_of_the_users_before_any_write(tmp_path, capsys):
    out = tmp_path / "mine"
    before = _user_folder(out)
    assert main(["calibrate", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty (.recipe.yaml.swp, notes.txt, qat, synth) and is not an mgtq calibration run" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "synth" / "important.txt").read_text() == "mine"


def test_calibrate_refuses_the_source_model_as_its_run_folder(tmp_path, capsys):
    from mgtq.default_model import default_model

    model = tmp_path / "model"
    import shutil

    shutil.copytree(default_model(), model)
    before = sorted(str(p.relative_to(model)) for p in model.rglob("*"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_recipe(recipe_from_dict({"model": str(model)})))
    for out in (model, model / "calibration"):
        assert main(["calibrate", "--recipe", str(recipe), "--out", str(out), "--no-progress"]) == 2
        assert f"overlaps the source model {model}" in capsys.readouterr().err
    assert sorted(str(p.relative_to(model)) for p in model.rglob("*")) == before


def test_an_empty_folder_or_an_mgtq_run_is_accepted(tmp_path):
    empty = RunFolder(tmp_path / "empty")
    empty.root.mkdir()
    empty.check_takeable(tmp_path / "model")
    run = RunFolder(tmp_path / "run")
    run.start(recipe_from_dict({}), tmp_path / "model", {})
    (run.root / "notes.txt").write_text("the user's notes beside a run")
    run.check_takeable(tmp_path / "model")
