"""The four stages of SCQ (paper arXiv 2411.10781 §4.1) as the list `mgtq calibrate` walks.

synthesize → QAT → magnitudes → secondary. When QAT treats the A8 layers differently (group-wise A16
weights, or int8 activations in the loop: `QATConfig.needs_a8_set`), the QAT stage first chooses the
A8 set on the pre-QAT W4 model by the secondary recipe and records it (`a8-plan.json`); secondary then
keeps that set and only calibrates its scales on the QAT model.

A stage names the recipe sections it depends on and a
`compute(ctx)` that calls its algorithm module (synthesis, qat, magnitudes, secondary) and returns
what its folder holds; the calibrate loop skips complete stages and writes the others atomically.
Each stage's fingerprint chains the ones before it, so a change re-runs everything after it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from mgtq.files import read_json, write_json
from mgtq.hashing import files_fingerprint
from mgtq.pipeline import MGTPipeline
from mgtq.quantization import linear_names
from mgtq.quantization.selection import select_a8_layers
from mgtq.sampling import SamplerConfig
from mgtq.scq import magnitudes, qat, secondary, synthesis
from mgtq.scq.recipe import Recipe
from mgtq.scq.run import STAGES as STAGE_NAMES
from mgtq.scq.run import RunFolder


def load_calibration_data(run: RunFolder, pipe: MGTPipeline) -> synthesis.CalibrationData:
    """The run's synthesized calibration set, its prompts encoded by `pipe`."""
    meta = run.stage_summary("synth")
    return synthesis.calibration_data(run.load_dataset(), pipe, meta["token_grid"], meta["resolution"])


@dataclass
class StageContext:
    """What the stages share within one `calibrate` call; the pipeline and data load on first use."""

    recipe: Recipe
    run: RunFolder
    model_dir: Path
    fingerprints: dict[str, str]
    progress: bool = True
    device: torch.device | str = "cpu"  # where the stages compute (accelerate's: this process's GPU where there is one)

    @cached_property
    def pipe(self) -> MGTPipeline:
        # progress too: `mgtq calibrate --no-progress` hides the weight-loading bar as well
        return MGTPipeline.from_pretrained(self.model_dir, text_encoder=self.recipe.text_encoder, device=self.device,
                                           progress=self.progress)

    def synthesis_pipe(self) -> MGTPipeline:
        """The pipeline that synthesizes: `pipe`, or one in `synthesis.dtype` loaded for that stage alone (the
        later stages train and encode prompts with the model as saved)."""
        dtype = self.recipe.synthesis.dtype
        if dtype == "auto":
            return self.pipe
        return MGTPipeline.from_pretrained(self.model_dir, text_encoder=self.recipe.text_encoder, device=self.device,
                                           torch_dtype=dtype, progress=self.progress)

    @cached_property
    def sampler(self) -> SamplerConfig:
        return synthesis.synthesis_sampler(self.pipe.settings.sampler, self.recipe.synthesis)

    @cached_property
    def data(self) -> synthesis.CalibrationData:
        data = load_calibration_data(self.run, self.pipe)  # the prompts encoded while the text encoder is on the device
        # then the pipeline leaves it: the stages that read the data train or measure a transformer of their own
        # there, and beside it the pipeline (~5 GiB at Meissonic's size) would only take memory (in a run resumed
        # after QAT, it is loaded for this alone)
        self.pipe.to("cpu")
        return data

    @cached_property
    def planned_a8(self) -> list[str]:
        """The A8 set QAT trained with ([] when the recipe chooses it after QAT)."""
        return read_json(self.run.a8_plan_file)["a8_layers"] if self.recipe.qat.needs_a8_set else []

    def fake_quant_qat_model(self):
        return qat.fake_quant_transformer(self.run.qat_weights, self.recipe.qat, self.planned_a8).to(self.device)


@dataclass(frozen=True)
class StageOutput:
    """A finished stage: what its stage.json records, and `write(folder)` for its files."""

    summary: dict
    write: Callable[[Path], None] = field(default=lambda folder: None)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # the recipe sections its result depends on
    compute: Callable[[StageContext], StageOutput]
    # also depends on these when the A8 set is chosen before QAT (QATConfig.needs_a8_set)
    plan_sections: tuple[str, ...] = ()
    all_processes: bool = False  # under `accelerate launch`: run on every process (else on the main one)


def _synthesize(ctx: StageContext) -> StageOutput:
    recipe, pipe = ctx.recipe, ctx.synthesis_pipe()
    pairs = synthesis.calibration_prompts(recipe.prompts)
    res = recipe.synthesis.resolution or pipe.settings.resolution
    sampler = synthesis.synthesis_sampler(pipe.settings.sampler, recipe.synthesis)  # ctx.sampler, from this pipe
    ds = synthesis.synthesize(pipe, pairs, sampler, res, recipe.synthesis.batch_size, ctx.progress,
                              desc="SCQ 1/4 synthesize", keep_images=recipe.synthesis.keep_images,
                              shards=ctx.run.synth_progress, fingerprint=ctx.fingerprints["synth"])
    summary = {"count": len(pairs), "token_grid": list(pipe.token_grid(res, res)), "sampler": sampler.to_dict(),
               "resolution": res}
    return StageOutput(summary, lambda folder: synthesis.save_dataset(ds, folder / RunFolder.DATASET, ctx.progress))


def choose_a8(ctx: StageContext, model, desc: str) -> tuple[list[str], dict[str, float]]:
    """(the A8 set, each layer's score) by `secondary.selection` on fake-quant `model` (all A16):
    scores are input magnitudes for "lowest", measured A8 damage for "sensitivity", none otherwise."""
    recipe = ctx.recipe
    cfg = recipe.secondary
    names = linear_names(model, recipe.qat.skip)
    if cfg.selection == "sensitivity":
        scores = secondary.measure_a8_sensitivity(model, names, ctx.data, cfg, recipe.magnitudes, ctx.sampler,
                                                  ctx.progress, desc=desc)
    elif cfg.selection == "lowest":
        scores = magnitudes.measure_magnitudes(model, ctx.data, recipe.magnitudes, ctx.sampler, names, ctx.progress,
                                               desc=desc)[0]
    else:
        scores = {}
    return select_a8_layers(scores or dict.fromkeys(names, 0.0), cfg.fraction, cfg.selection,
                                      cfg.seed), scores


def _plan_a8(ctx: StageContext) -> dict:
    """The A8 set chosen on the pre-QAT W4 model (A16 layers on their group grid), and for
    activations in the loop its input scales calibrated there."""
    recipe = ctx.recipe
    model = copy.deepcopy(ctx.pipe.transformer).float().eval()
    qat.prepare_fake_quant_(model, recipe.qat)
    a8, scores = choose_a8(ctx, model, "SCQ 2/4 A8 set before QAT")
    scales = None
    if recipe.qat.activations_in_loop:
        scales = secondary.calibrate_input_scales_(model, a8, ctx.data, recipe.secondary, recipe.magnitudes,
                                                   ctx.sampler, ctx.progress, desc="SCQ 2/4 A8 scales before QAT")
    return {"selection": recipe.secondary.selection, "fraction": recipe.secondary.fraction, "a8_layers": a8,
            "scores": scores, "input_scales": scales}


def _qat(ctx: StageContext) -> StageOutput:
    plan = _plan_a8(ctx) if ctx.recipe.qat.needs_a8_set else None
    data = ctx.data  # the prompts encoded, the pipeline off the device: QAT trains a copy on accelerate's device
    result = qat.train_qat(ctx.pipe.transformer, data, ctx.recipe.qat, ctx.sampler, ctx.run.qat_state,
                           ctx.fingerprints["qat"], ctx.progress, a8_layers=plan["a8_layers"] if plan else (),
                           input_scales=plan["input_scales"] if plan else None)
    config = ctx.pipe.transformer.config

    def write(folder: Path) -> None:
        qat.save_float_transformer(config, result.weights, folder / RunFolder.QAT_WEIGHTS)
        if plan is not None:
            write_json(folder / RunFolder.A8_PLAN, plan)

    return StageOutput(result.summary, write)


def _magnitudes(ctx: StageContext) -> StageOutput:
    cfg = ctx.recipe.magnitudes
    model = ctx.fake_quant_qat_model()
    names = linear_names(model, ctx.recipe.qat.skip)
    chosen, table = magnitudes.measure_magnitudes(model, ctx.data, cfg, ctx.sampler, names, ctx.progress,
                                                  desc="SCQ 3/4 magnitudes")
    return StageOutput({"layers": len(names)}, lambda folder: write_json(
        folder / RunFolder.MAGNITUDES, {"statistic": cfg.statistic, "magnitude": chosen, "stats": table}))


def _secondary(ctx: StageContext) -> StageOutput:
    recipe, cfg = ctx.recipe, ctx.recipe.secondary
    mags = read_json(ctx.run.magnitudes_file)["magnitude"]
    extra = {}
    if recipe.qat.needs_a8_set:
        a8 = ctx.planned_a8
        extra["chosen_before_qat"] = True
        if cfg.selection == "sensitivity":
            extra["sensitivity"] = read_json(ctx.run.a8_plan_file)["scores"]
    elif cfg.selection == "sensitivity":
        a8, extra["sensitivity"] = choose_a8(ctx, ctx.fake_quant_qat_model(), "SCQ 4/4 sensitivity")
    else:
        a8 = select_a8_layers(mags, cfg.fraction, cfg.selection, cfg.seed)
    model = ctx.fake_quant_qat_model()
    scales = secondary.calibrate_input_scales_(model, a8, ctx.data, cfg, recipe.magnitudes, ctx.sampler,
                                               ctx.progress, desc="SCQ 4/4 secondary")
    loss = qat.fixed_eval_metrics(model, ctx.data, ctx.sampler, ctx.device)["ce"]

    def write(folder: Path) -> None:
        write_json(folder / RunFolder.SELECTION, {"selection": cfg.selection, "fraction": cfg.fraction, "a8_layers": a8,
                                                  "input_scales": scales,
                                                  "magnitude_statistic": recipe.magnitudes.statistic, **extra})
        secondary.plot_magnitudes(mags, a8, recipe.magnitudes.statistic, folder / RunFolder.PLOT)

    return StageOutput({"a8_layers": len(a8), "layers": len(mags), "loss_w4a8_fake_quant": loss}, write)


STAGES: tuple[Stage, ...] = (
    Stage("synth", ("prompts", "synthesis"), _synthesize),
    Stage("qat", ("qat",), _qat, plan_sections=("magnitudes", "secondary"), all_processes=True),
    Stage("magnitudes", ("magnitudes",), _magnitudes),
    Stage("secondary", ("secondary",), _secondary),
)
assert tuple(s.name for s in STAGES) == STAGE_NAMES


# What the stages read of the source pipeline folder: every component, and the sampler settings.
SOURCE_PARTS = ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def input_fingerprint(recipe: Recipe, model_dir: str | Path) -> str:
    """Fingerprint of everything outside the run that the stages read: each component of the source
    pipeline (the recipe's separate text encoder in place of the folder's own), its model_index.json
    (sampler settings) and scheduler, and the text of `prompts.file`."""
    parts = {name: Path(model_dir) / name for name in SOURCE_PARTS}
    if recipe.text_encoder is not None:
        parts["text_encoder"] = Path(recipe.text_encoder)
    if recipe.prompts.source == "file":
        parts["prompts.file"] = Path(recipe.prompts.file)
    return files_fingerprint(parts)


def stage_fingerprints(recipe: Recipe, inputs: str) -> dict[str, str]:
    """{stage: fingerprint}; each chains the one before it, starting from `input_fingerprint`'s."""
    fps, prev = {}, inputs
    for stage in STAGES:
        sections = stage.sections + (stage.plan_sections if recipe.qat.needs_a8_set else ())
        prev = hashlib.sha256((prev + recipe.section_fingerprint(*sections)).encode()).hexdigest()[:16]
        fps[stage.name] = prev
    return fps
