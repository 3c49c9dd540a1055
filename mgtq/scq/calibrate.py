"""`mgtq calibrate`: run SCQ's four stages for a recipe into a run folder, resuming what is done."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mgtq.pipeline import MGTPipeline
from mgtq.scq.recipe import Recipe, dump_recipe, load_recipe
from mgtq.scq.stages import (
    STAGES,
    load_calibration_data,
    run_magnitudes,
    run_qat,
    run_secondary,
    run_synthesize,
    stage_complete,
    stage_fingerprints,
)
from mgtq.utils import atomic_write_text, model_fingerprint, read_json, write_json


def resolve_model(recipe: Recipe) -> Path:
    if recipe.model == "default":
        from mgtq.default_model import default_model

        return default_model()
    path = Path(recipe.model)
    if not path.is_dir():
        raise FileNotFoundError(f"recipe model {path} does not exist (a local pipeline folder is needed)")
    return path


def calibrate(recipe: Recipe | str | Path, out: str | Path, progress: bool = True) -> dict:
    """Run (or resume) SCQ; returns {stage: "ran" | "skipped"} plus the run's summary.

    Under `accelerate launch` every process runs this; the synthesize, magnitudes and secondary
    stages run on the main process while the others wait, and QAT runs data-parallel on all.
    """
    from accelerate import PartialState

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    state = PartialState(cpu=not torch.cuda.is_available())
    model_dir = resolve_model(recipe)
    fps = stage_fingerprints(recipe, model_fingerprint(model_dir))
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
        write_json(out / "run.json", {"model": str(model_dir), "fingerprints": fps})
    state.wait_for_everyone()

    def load_pipe():
        return MGTPipeline.from_pretrained(model_dir, text_encoder=recipe.text_encoder)

    report, t0 = {}, time.time()
    pipe = load_pipe()
    dirs = {s: out / s for s in STAGES}

    if not stage_complete(dirs["synth"], fps["synth"]):
        if state.is_main_process:
            run_synthesize(recipe, pipe, dirs["synth"], fps["synth"], progress)
        report["synth"] = "ran"
    else:
        report["synth"] = "skipped"
    state.wait_for_everyone()
    data = load_calibration_data(dirs["synth"], pipe)

    if not stage_complete(dirs["qat"], fps["qat"]):
        run_qat(recipe, pipe, data, dirs["qat"], out / "qat-state", fps["qat"], progress)
        report["qat"] = "ran"
    else:
        report["qat"] = "skipped"
    state.wait_for_everyone()

    for stage, fn in (("magnitudes", lambda: run_magnitudes(recipe, load_pipe(), data, dirs["qat"], dirs["magnitudes"],
                                                            fps["magnitudes"], progress)),
                      ("secondary", lambda: run_secondary(recipe, load_pipe(), data, dirs["qat"], dirs["magnitudes"],
                                                          dirs["secondary"], fps["secondary"], progress))):
        if stage_complete(dirs[stage], fps[stage]):
            report[stage] = "skipped"
        else:
            if state.is_main_process:
                fn()
            report[stage] = "ran"
        state.wait_for_everyone()

    report["seconds"] = round(time.time() - t0, 1)
    report["qat_loss"] = {k: read_json(dirs["qat"] / "stage.json")[k] for k in ("loss_before", "loss_after")}
    report["a8_layers"] = read_json(dirs["secondary"] / "stage.json")["a8_layers"]
    return report
