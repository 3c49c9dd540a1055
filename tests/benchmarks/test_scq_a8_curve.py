"""benchmarks/scq_a8_curve.py: every point of the curve is a calibration seeded from the base run."""

import pytest

from mgtq.scq.calibrate import calibrate
from mgtq.scq.recipe import recipe_from_dict
from mgtq.scq.run import STAGES, RunFolder
from testkit import tiny_recipe_dict


def _recipe(model_dir, **secondary):
    data = tiny_recipe_dict(model_dir, synthesis={"num_steps": 3}, qat={"steps": 4})
    return recipe_from_dict({**data, "secondary": {**data.get("secondary", {}), **secondary}})


def test_a_point_starts_from_the_base_run_and_reruns_only_what_its_recipe_changes(tmp_path, random_pipeline_dir,
                                                                                   benchmark_script):
    curve = benchmark_script("scq_a8_curve")
    base, point = tmp_path / "base", tmp_path / "work" / "point"
    calibrate(_recipe(random_pipeline_dir), base, progress=False)
    curve.seed_run(base, point)
    assert not (point / RunFolder.LOCK).exists()  # the base run's lock file is its own
    report = calibrate(_recipe(random_pipeline_dir, selection="all"), point, progress=False, restart=True)
    # The same synthesized images and QAT (their inputs did not change); only the A8 selection ran again.
    assert [report[s] for s in STAGES] == ["skipped", "skipped", "skipped", "ran"]
    assert RunFolder(base).recipe().secondary.selection != RunFolder(point).recipe().secondary.selection
    with pytest.raises(FileExistsError):  # a point's folder is never overwritten: resuming reuses it
        curve.seed_run(base, point)


def test_a_point_interrupted_while_seeded_leaves_nothing(tmp_path, monkeypatch, benchmark_script):
    curve = benchmark_script("scq_a8_curve")
    base = tmp_path / "base"
    (base / "synth").mkdir(parents=True)
    (base / "synth" / "images.bin").write_bytes(b"x" * 1000)
    copytree = curve.shutil.copytree

    def killed_midway(src, dst, *args, **kw):  # copytree calls itself for sub-folders: be killed in one of them
        copytree(src, dst, *args, **kw)
        if src.name == "synth":
            raise KeyboardInterrupt

    monkeypatch.setattr(curve.shutil, "copytree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        curve.seed_run(base, tmp_path / "work" / "point")
    assert list((tmp_path / "work").iterdir()) == []  # no point and no half-copied sibling: the next run starts anew
