"""benchmarks/scq_a8_curve.py: every point of the curve is a calibration seeded from the base run."""

import pytest

from mgtq.scq.calibrate import calibrate
from mgtq.scq.recipe import recipe_from_dict
from mgtq.scq.run import STAGES, RunFolder
from mgtq.testing import tiny_recipe_dict


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
    assert sorted(p.name for p in point.parent.iterdir()) == ["point"]  # nothing half-copied beside it
