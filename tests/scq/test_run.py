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
    (run.root / ".qat-state.old-1234").mkdir()
    (run.root / ".qat-state.old-1234" / "trainer.json").write_text("{}")
    (run.root / ".qat-state.tmp-abcd").mkdir()  # the new copy, maybe incomplete
    (run.root / "synth").mkdir()
    (run.root / ".synth.old-5678").mkdir()  # killed while deleting the replaced copy
    (run.root / ".recipe.yaml.x1y2").write_text("half")  # atomic_write_text's temporary file
    (run.root / ".user-notes").write_text("mine")  # not ours: kept
    run.start(recipe_from_dict({}), tmp_path, {})
    assert (run.qat_state / "trainer.json").read_text() == "{}"
    assert sorted(p.name for p in run.root.iterdir() if p.name.startswith(".")) == [".user-notes"]


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
