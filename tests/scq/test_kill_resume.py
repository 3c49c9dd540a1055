"""A real SIGKILL of `mgtq calibrate` in every stage (and inside QAT's saves), then a resume: the
run ends byte-identical to an uninterrupted one, and no debris is left."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from testkit import tiny_recipe_dict


HARNESS = Path(__file__).with_name("calibrate_and_die.py")


def _tiny_recipe(model_dir) -> dict:
    return tiny_recipe_dict(model_dir, synthesis={"batch_size": 4}, qat={"steps": 16, "batch_size": 2, "save_every": 4},
                            magnitudes={"batch_size": 4})


def _files(run: Path) -> dict[str, str]:
    """sha256 of every file of a run, except the lock and the resumable QAT state."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock" and "qat-state" not in p.relative_to(run).parts}


def test_sigkill_in_every_stage_then_resume_is_byte_identical(tmp_path, random_pipeline_dir):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_tiny_recipe(random_pipeline_dir)))
    run, reference = tmp_path / "killed", tmp_path / "reference"
    # Each child resumes where the one before was killed; QAT saves its state every 4 steps, so the
    # kills land in a half-written state, between the renames of a state swap (where folders cannot be exchanged),
    # right after an exchange, and between saves.
    points = ["synth", "qat-save", "qat-swap", "qat-exchanged", "qat-step:7", "magnitudes", "secondary", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    children = [f"{run}={point}" for point in points] + [f"{reference}=none"]
    proc = subprocess.run([sys.executable, str(HARNESS), str(recipe_file), *children], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert statuses == ["SIGKILL"] * (len(points) - 1) + [0, 0], proc.stderr[-3000:]
    assert _files(run) == _files(reference)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
