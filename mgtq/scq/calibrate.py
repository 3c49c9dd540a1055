"""`mgtq calibrate`: walk SCQ's stages for a recipe in a run folder, resuming what is done."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import torch

from mgtq.scq import qat
from mgtq.scq.recipe import Recipe, load_recipe
from mgtq.scq.run import RunFolder
from mgtq.scq.stages import STAGES, StageContext, input_fingerprint, stage_fingerprints


def resolve_model(recipe: Recipe) -> Path:
    """The recipe's `model:` → a pipeline folder: "default", an embedded model's name or a local folder."""
    from mgtq.default_model import default_model, model_folder

    if recipe.model == "default":
        return default_model()
    try:
        folder = model_folder(recipe.model)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"recipe model: {err}") from None
    from mgtq.quantization import checkpoint

    if (folder / "transformer").is_dir() and checkpoint.is_quantized(folder / "transformer"):
        raise ValueError(f"recipe model: {recipe.model} is a quantized mgtq checkpoint; SCQ calibrates a float model "
                         "(its QAT trains the float weights): set model: to the float pipeline it was made from")
    return folder


def check_run_current(out: str | Path) -> Path:
    """Raise ValueError naming the stage to rerun unless every stage of run `out` is complete, was made
    from today's source model, text encoder and prompts, and its files are the ones it wrote; returns the
    source model folder (the recipe's, not whatever run.json says)."""
    run = RunFolder(out)
    recipe = run.recipe()
    run.check_finished()
    model_dir = resolve_model(recipe)
    rerun = (f"rerun `mgtq calibrate --recipe {run.root / RunFolder.RECIPE} --out {run.root}` (it reruns that "
             "stage and the ones after it)")
    recorded = run.info()["fingerprints"]
    for stage, fingerprint in stage_fingerprints(recipe, input_fingerprint(recipe, model_dir)).items():
        if recorded.get(stage) != fingerprint:
            raise ValueError(f"stage {stage!r} of {run.root} was computed from other inputs than today's (the source "
                             f"model {model_dir}, its text encoder, tokenizer, sampler settings or the prompts file "
                             f"changed, or an older mgtq made it); {rerun}")
    for stage in STAGES:
        changed = run.changed_outputs(stage.name)
        if changed:
            raise ValueError(f"stage {stage.name!r} of {run.root}: {changed} changed since the stage wrote it; {rerun}")
    return model_dir


def environment(device) -> dict:
    """What a stage's numbers depend on besides its inputs: mgtq's and torch's versions and the kernels that ran
    (`describe_kernels`: the CPU class, or the GPU); recorded in each stage.json as "made_with"."""
    import mgtq
    from mgtq.quantization.kernels import describe_kernels

    return {"mgtq": mgtq.__version__, **describe_kernels(device)}


def _warn_reused_from_elsewhere(run: RunFolder, reused: list[str], made_with: dict) -> None:
    """Say so where the complete stages this call reuses were computed by another mgtq, torch or machine class:
    kernels round sums in their own order, so a fresh run here could differ a little."""
    elsewhere = {}
    for name in reused:
        recorded = run.stage_summary(name).get("made_with")
        if recorded is None:
            elsewhere[name] = "not recorded (an older mgtq)"
        elif recorded != made_with:
            keys = sorted(set(made_with) | set(recorded))
            elsewhere[name] = ", ".join(f"{k} {recorded.get(k)!r}" for k in keys if recorded.get(k) != made_with.get(k))
    if elsewhere:
        said = "; ".join(f"{name}: {what}" for name, what in elsewhere.items())
        warnings.warn(f"{run.root}: reusing stages computed elsewhere ({said}; here: mgtq {made_with['mgtq']}, "
                      f"torch {made_with['torch']}, {made_with['device']}); a fresh run here could differ a little: "
                      "delete those stage folders to compute them here", stacklevel=3)


def _preflight(recipe: Recipe, model_dir: Path) -> None:
    """What would fail only in the QAT stage, said before the first stage (synthesis can take hours)."""
    from accelerate import init_empty_weights

    from mgtq.models import MeissonicTransformer

    folder = model_dir / "transformer"
    try:
        with init_empty_weights(include_buffers=True):  # shapes only, no memory
            skeleton = MeissonicTransformer.from_config(MeissonicTransformer.load_config(folder))
    except (OSError, ValueError, TypeError):
        return  # a folder the loader will refuse, naming what is wrong
    qat.check_fits(skeleton, recipe.qat)


def calibrate(recipe: Recipe | str | Path, out: str | Path, progress: bool = True, restart: bool = False) -> dict:
    """Run (or resume) SCQ; returns {stage: "ran" | "skipped"} plus the run's summary.

    A run folder follows one recipe: a different one is refused unless `restart` (then the folder
    takes the new recipe and every stage whose inputs changed runs again). Under `accelerate launch`
    every process runs this; the synthesize, magnitudes and secondary stages run on the main process
    while the others wait, and QAT runs data-parallel on all.
    """
    from accelerate import PartialState

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    model_dir = resolve_model(recipe)
    run = RunFolder(out)
    if main:
        run.check_takeable(model_dir)
    report, t0 = {}, time.time()
    with run.lock() if main else contextlib.nullcontext():
        fps = stage_fingerprints(recipe, input_fingerprint(recipe, model_dir))
        _preflight(recipe, model_dir)
        if main:
            run.start(recipe, model_dir, fps, restart)
        state.wait_for_everyone()
        # checked once: it hashes each stage's outputs (the QAT weights are gigabytes at Meissonic's size), and
        # running a stage never changes whether a later one is complete (fingerprints chain inputs, not outputs)
        complete = {stage.name: run.stage_complete(stage.name, fps[stage.name]) for stage in STAGES}
        if not complete["qat"]:
            qat.check_accelerator(recipe.qat)  # before synthesis, which can take hours
        ctx = StageContext(recipe, run, model_dir, fps, progress, device=state.device)
        made_with = environment(state.device)
        if main:
            _warn_reused_from_elsewhere(run, [name for name, done in complete.items() if done], made_with)
        for stage in STAGES:
            if complete[stage.name]:
                report[stage.name] = "skipped"
            else:
                if stage.all_processes or main:
                    output = stage.compute(ctx)
                    if main:
                        run.write_stage(stage.name, fps[stage.name], {**output.summary, "made_with": made_with},
                                        output.write)
                report[stage.name] = "ran"
            state.wait_for_everyone()
    report["seconds"] = round(time.time() - t0, 1)
    report["qat_loss"] = {k: run.stage_summary("qat")[k] for k in ("loss_before", "loss_after")}
    report["a8_layers"] = run.stage_summary("secondary")["a8_layers"]
    return report

