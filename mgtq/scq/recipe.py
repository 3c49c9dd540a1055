"""SCQ recipes: YAML files that map one-to-one onto validated dataclasses.

    model: checkpoints/tiny-shapes        # pipeline folder ("default" = the embedded model; or an embedded name)
    prompts:   {source: shapebench, count: 64, seed: 0}
    synthesis: {num_steps: 16, guidance_scale: 3.0, batch_size: 16}
    qat:       {steps: 300, lr: 1.0e-4, batch_size: 16, gradient_accumulation: 1, weight_bits: 4, group_size: null}
    magnitudes: {statistic: mean_abs, mask_ratios: [0.25, 0.5, 0.75, 1.0]}
    secondary: {fraction: 0.3333, selection: lowest}
    export:    {dtype: float32}

An unknown or misspelled key anywhere is an error that names it and lists the known keys.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mgtq.config import from_mapping, read_mapping, validate
from mgtq.dtypes import FloatDtype
from mgtq.limits import MAX_GUIDANCE, MAX_IMAGES, MAX_PROMPTS, MAX_RESOLUTION, MAX_STEPS
from mgtq.quantization.qtensor import check_group_size
from mgtq.quantization.selection import A8_FRACTION


def _at_most(section, where: str, maximum: int | float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value > maximum:
            raise ValueError(f"{where}.{name} must be ≤ {maximum} (mgtq.limits), got {value}")


def _at_least(section, where: str, minimum: int | float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise ValueError(f"{where}.{name} must be ≥ {minimum}, got {value}")


@dataclass(frozen=True)
class PromptsConfig:
    """Calibration prompts: ShapeBench's prompt list, the shapes grammar, or a text file (one per line).

    count prompts; sample i is generated with seed `seed + i`.
    """

    source: Literal["shapebench", "grammar", "file"] = "shapebench"
    file: str | None = None
    count: int = 64
    seed: int = 0

    def __post_init__(self):
        validate(self, "prompts")
        if self.source == "file" and not self.file:
            raise ValueError("prompts.source is 'file' but prompts.file is not set")
        if self.source != "file" and self.file:  # it would be ignored
            raise ValueError(f"prompts.file is set but prompts.source is {self.source!r}: set source: file to "
                             "calibrate on that file's prompts, or remove file")
        _at_least(self, "prompts", 1, "count")
        _at_most(self, "prompts", MAX_PROMPTS, "count")
        _at_least(self, "prompts", 0, "seed")


@dataclass(frozen=True)
class SynthesisConfig:
    """How the float model synthesizes its own calibration images (its vanilla sampler).

    dtype: what the transformer and text encoder sample in ("auto": as saved); for this stage only, the later
    ones train and encode with the model as saved. bfloat16 samples an fp32 checkpoint several times faster on a
    GPU. keep_images: also decode the images and keep them in the synthesized set; no later stage reads them
    (they use the tokens and prompts), and at 1024 px the VQ decode is the stage's largest memory.
    """

    num_steps: int = 16
    guidance_scale: float = 3.0
    batch_size: int = 16
    resolution: int | None = None  # None = the model's default
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    keep_images: bool = True

    def __post_init__(self):
        validate(self, "synthesis")
        _at_least(self, "synthesis", 1, "num_steps", "batch_size", "resolution")
        _at_least(self, "synthesis", 0, "guidance_scale")
        _at_most(self, "synthesis", MAX_STEPS, "num_steps")
        _at_most(self, "synthesis", MAX_RESOLUTION, "resolution")
        _at_most(self, "synthesis", MAX_GUIDANCE, "guidance_scale")
        _at_most(self, "synthesis", MAX_IMAGES, "batch_size")


@dataclass(frozen=True)
class QATConfig:
    """W4 quantization-aware training on the synthesized tokens.

    objective: "ce" is the paper's masked-token cross-entropy against the synthesized tokens;
    "distill" is the KL divergence from the float model's own predictions at the masked positions
    (the float transformer is the teacher, on the same masked inputs); "ce+distill" adds the two.
    Distillation trains against the float model's whole distribution rather than one sampled token
    per position, so a few hundred self-synthesized images cannot be memorised the way CE memorises
    them (CE on a small calibration set overfits and the QAT model drifts from the float one).

    group_size: null = per output channel for every layer; an integer groups the layers that stay A16
    while the A8 layers keep per-channel weights (what their int8 GEMM rescales by).
    activations_in_loop: also fake-quantize the A8 layers' inputs to int8 during QAT, with static scales
    calibrated on the model before QAT (re-calibrated on the QAT model by the secondary stage).
    With either, QAT must know the A8 set, so it is chosen before QAT (secondary.selection applied to
    the pre-QAT W4 model) and kept: the exported grids are then the ones QAT trained on. The other way,
    re-fitting A8 layers per channel after a group-wise QAT, would need a second training pass.
    skip: fnmatch patterns of Linear names left in float.
    gradient_checkpointing: recompute each transformer block's activations in the backward pass instead of keeping
    them (fake quant keeps an fp32 copy of every weight per micro-batch: most of a large model's training memory).
    The same losses and gradients, more compute; it changes no result, so it is not part of the run's fingerprint
    and can be switched on to resume a run that ran out of memory.
    """

    steps: int = 300
    lr: float = 1e-4
    objective: Literal["ce", "distill", "ce+distill"] = "ce"
    batch_size: int = 16
    gradient_accumulation: int = 1
    weight_bits: int = 4
    group_size: int | None = None
    skip: tuple[str, ...] = ()
    weight_decay: float = 0.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cond_drop: float = 0.1
    save_every: int = 50  # steps between resumable QAT states
    seed: int = 0
    activations_in_loop: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        validate(self, "qat")
        if self.weight_bits != 4:
            raise ValueError(f"qat.weight_bits must be 4 (mgtq exports int4 weights), got {self.weight_bits}")
        _at_least(self, "qat", 0, "steps", "weight_decay", "seed")
        _at_least(self, "qat", 1, "batch_size", "gradient_accumulation", "save_every")
        if self.lr <= 0:
            raise ValueError(f"qat.lr must be positive, got {self.lr}")
        check_group_size(self.group_size, "qat.group_size", none="null")
        if not 0 <= self.cond_drop < 1:
            raise ValueError(f"qat.cond_drop must be in [0, 1), got {self.cond_drop}")

    @property
    def needs_a8_set(self) -> bool:
        """Whether QAT treats A8 layers differently (so the A8 set is chosen before QAT)."""
        return self.group_size is not None or self.activations_in_loop


@dataclass(frozen=True)
class MagnitudeConfig:
    """Per-Linear input-activation magnitude over the calibration data and timesteps.

    statistic: mean_abs | absmax | percentile; the model sees the synthesized tokens masked at each
    of mask_ratios (its timesteps), with text conditioning as the sampler feeds it ([uncond, cond]).
    """

    statistic: Literal["mean_abs", "absmax", "percentile"] = "mean_abs"
    percentile: float = 99.9
    mask_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    batch_size: int = 16
    max_samples: int | None = None

    def __post_init__(self):
        validate(self, "magnitudes")
        if not self.mask_ratios or not all(0 < r <= 1 for r in self.mask_ratios):
            raise ValueError(f"magnitudes.mask_ratios must be values in (0, 1], got {list(self.mask_ratios)}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"magnitudes.percentile must be in (0, 100], got {self.percentile}")
        _at_least(self, "magnitudes", 1, "batch_size", "max_samples")


@dataclass(frozen=True)
class SecondaryConfig:
    """Secondary calibration: which layers get int8 activations, and their static scales.

    selection: lowest (SCQ: the `fraction` of layers with the lowest magnitude) | random (the
    paper's ablation) | sensitivity (the `fraction` whose move to A8, each alone, changes the model's
    masked-token predictions least: KL to the all-A16 model on `sensitivity_samples` calibration
    images at the magnitudes' mask ratios) | all (W4A8 everywhere). scale_method: absmax or
    percentile of |x|.
    """

    fraction: float = A8_FRACTION
    selection: Literal["lowest", "random", "sensitivity", "all"] = "lowest"
    seed: int = 0
    scale_method: Literal["absmax", "percentile"] = "absmax"
    percentile: float = 99.99
    sensitivity_samples: int = 16

    def __post_init__(self):
        validate(self, "secondary")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"secondary.fraction must be in [0, 1], got {self.fraction}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"secondary.percentile must be in (0, 100], got {self.percentile}")
        _at_least(self, "secondary", 0, "seed")
        _at_least(self, "secondary", 1, "sensitivity_samples")


@dataclass(frozen=True)
class ExportConfig:
    """dtype of the parts that stay float (embeddings, norms, convs, biases) in the exported checkpoint (default
    bfloat16, Meissonic's; the tiny-shapes recipes export float32)."""

    dtype: FloatDtype = "bfloat16"

    def __post_init__(self):
        validate(self, "export")


@dataclass(frozen=True)
class Recipe:
    model: str = "default"
    text_encoder: str | None = None
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    magnitudes: MagnitudeConfig = field(default_factory=MagnitudeConfig)
    secondary: SecondaryConfig = field(default_factory=SecondaryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        validate(self)
        if not self.model:
            raise ValueError("model must name a pipeline folder or be 'default'")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def section_fingerprint(self, *names: str) -> str:
        """Hash of the named sections (stage outputs are reused only while these are unchanged).

        The fields of _OPTIONAL_FIELDS count only when set away from their default, those of _HOW_FIELDS never.
        """
        data = {n: self.to_dict()[n] for n in names}
        for (section, key), default in _OPTIONAL_FIELDS.items():
            if section in data and data[section].get(key) == default:
                del data[section][key]
        for section, key in _HOW_FIELDS:
            data.get(section, {}).pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: Recipe) -> list[str]:
        """Dotted keys whose values differ, e.g. ["qat.steps", "secondary.selection"]."""
        return _diff(self.to_dict(), other.to_dict(), "")


def _diff(a, b, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{where}.{k}" if where else k)]
    return [] if a == b else [where]


# (section, field) → the default at which the field changes nothing a recipe without it computes. Left out
# of the fingerprint there, so a run folder whose recipe.yaml lacks the field stays complete.
_OPTIONAL_FIELDS = {("qat", "activations_in_loop"): False, ("secondary", "sensitivity_samples"): 16,
                    ("synthesis", "dtype"): "auto", ("synthesis", "keep_images"): True}
# (section, field)s that change how a stage computes (memory, time), never what: outside the fingerprint, so
# switching one on (e.g. after running out of memory) resumes the run's stages and training state.
_HOW_FIELDS = (("qat", "gradient_checkpointing"),)

_SECTIONS = ("prompts", "synthesis", "qat", "magnitudes", "secondary", "export")


def recipe_from_dict(data: typing.Mapping) -> Recipe:
    """A Recipe from a mapping: unknown keys, wrong types and out-of-range values are errors naming the key."""
    if isinstance(data, typing.Mapping):  # `qat:` with every key commented out means the section's defaults
        data = {k: v for k, v in data.items() if not (v is None and k in _SECTIONS)}
    return from_mapping(Recipe, data, "")


def load_recipe(path: str | Path) -> Recipe:
    from mgtq.default_model import recipe_file

    path = recipe_file(path)
    data = read_mapping(path, f"recipe {path}", fmt="yaml")
    if not data:
        # An empty file would silently run dataclass defaults that differ from every shipped recipe.
        raise ValueError(f"recipe {path} is empty; start from recipes/tiny-shapes-w4a8-scq.yaml (or pass no "
                         "--recipe to use it)")
    try:
        return recipe_from_dict(data)
    except ValueError as err:
        raise ValueError(f"recipe {path}: {err}") from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
