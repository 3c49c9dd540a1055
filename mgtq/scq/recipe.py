"""SCQ recipes: YAML files that map one-to-one onto validated dataclasses.

    model: checkpoints/tiny-shapes        # pipeline folder ("default" = the embedded model)
    prompts:   {source: shapebench, count: 64, seed: 0}
    synthesis: {num_steps: 16, guidance_scale: 3.0, batch_size: 16}
    qat:       {steps: 300, lr: 1.0e-4, batch_size: 16, gradient_accumulation: 1, weight_bits: 4, group_size: null}
    magnitudes: {statistic: mean_abs, mask_ratios: [0.25, 0.5, 0.75, 1.0]}
    secondary: {fraction: 0.3333, selection: lowest}
    export:    {dtype: float32}

An unknown or misspelled key anywhere is an error that names it and lists the known keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PromptsConfig:
    """Calibration prompts: ShapeBench's prompt list, the shapes grammar, or a text file (one per line).

    count prompts; sample i is generated with seed `seed + i`.
    """

    source: str = "shapebench"
    file: str | None = None
    count: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.source not in ("shapebench", "grammar", "file"):
            raise ValueError(f"prompts.source must be shapebench, grammar or file, got {self.source!r}")
        if self.source == "file" and not self.file:
            raise ValueError("prompts.source is 'file' but prompts.file is not set")
        if self.count < 1:
            raise ValueError(f"prompts.count must be ≥ 1, got {self.count}")


@dataclass(frozen=True)
class SynthesisConfig:
    """How the float model synthesizes its own calibration images (its vanilla sampler)."""

    num_steps: int = 16
    guidance_scale: float = 3.0
    batch_size: int = 16
    resolution: int | None = None  # None = the model's default

    def __post_init__(self):
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("synthesis.num_steps and synthesis.batch_size must be ≥ 1")


QAT_OBJECTIVES = ("ce", "distill", "ce+distill")


@dataclass(frozen=True)
class QATConfig:
    """W4 quantization-aware training on the synthesized tokens.

    objective: "ce" is the paper's masked-token cross-entropy against the synthesized tokens;
    "distill" is the KL divergence from the float model's own predictions at the masked positions
    (the float transformer is the teacher, on the same masked inputs); "ce+distill" adds the two.
    Distillation trains against the float model's whole distribution rather than one sampled token
    per position, so a few hundred self-synthesized images cannot be memorised the way CE memorises
    them (CE on a small calibration set overfits and the QAT model drifts from the float one).

    group_size: null = per output channel (what the int8 GEMM of A8 layers needs, so the QAT grid is
    exactly the exported one for every layer); an integer groups the W4A16 layers.
    skip: fnmatch patterns of Linear names left in float.
    """

    steps: int = 300
    lr: float = 1e-4
    objective: str = "ce"
    batch_size: int = 16
    gradient_accumulation: int = 1
    weight_bits: int = 4
    group_size: int | None = None
    skip: tuple[str, ...] = ()
    weight_decay: float = 0.0
    mixed_precision: str = "no"
    cond_drop: float = 0.1
    save_every: int = 50  # steps between resumable QAT states
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.save_every < 1:
            raise ValueError(f"qat.save_every must be ≥ 1, got {self.save_every}")
        if self.weight_bits != 4:
            raise ValueError(f"qat.weight_bits must be 4 (mgtq exports int4 weights), got {self.weight_bits}")
        if self.steps < 0 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError("qat.steps ≥ 0, qat.batch_size ≥ 1 and qat.gradient_accumulation ≥ 1 are required")
        if self.lr <= 0:
            raise ValueError(f"qat.lr must be positive, got {self.lr}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"qat.group_size must be null or an even integer ≥ 2, got {self.group_size}")
        if self.objective not in QAT_OBJECTIVES:
            raise ValueError(f"qat.objective must be one of {', '.join(QAT_OBJECTIVES)}, got {self.objective!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"qat.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")


@dataclass(frozen=True)
class MagnitudeConfig:
    """Per-Linear input-activation magnitude over the calibration data and timesteps.

    statistic: mean_abs | absmax | percentile; the model sees the synthesized tokens masked at each
    of mask_ratios (its timesteps), with text conditioning as the sampler feeds it ([uncond, cond]).
    """

    statistic: str = "mean_abs"
    percentile: float = 99.9
    mask_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    batch_size: int = 16
    max_samples: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "mask_ratios", tuple(float(r) for r in self.mask_ratios))
        if self.statistic not in ("mean_abs", "absmax", "percentile"):
            raise ValueError(f"magnitudes.statistic must be mean_abs, absmax or percentile, got {self.statistic!r}")
        if not self.mask_ratios or not all(0 < r <= 1 for r in self.mask_ratios):
            raise ValueError(f"magnitudes.mask_ratios must be values in (0, 1], got {self.mask_ratios}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"magnitudes.percentile must be in (0, 100], got {self.percentile}")


@dataclass(frozen=True)
class SecondaryConfig:
    """Secondary calibration: which layers get int8 activations, and their static scales.

    selection: lowest (SCQ: the `fraction` of layers with the lowest magnitude) | random (the
    paper's ablation) | all (W4A8 everywhere). scale_method: absmax or percentile of |x|.
    """

    fraction: float = 1 / 3
    selection: str = "lowest"
    seed: int = 0
    scale_method: str = "absmax"
    percentile: float = 99.99

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"secondary.fraction must be in [0, 1], got {self.fraction}")
        if self.selection not in ("lowest", "random", "all"):
            raise ValueError(f"secondary.selection must be lowest, random or all, got {self.selection!r}")
        if self.scale_method not in ("absmax", "percentile"):
            raise ValueError(f"secondary.scale_method must be absmax or percentile, got {self.scale_method!r}")


@dataclass(frozen=True)
class ExportConfig:
    """dtype of the parts that stay float (embeddings, norms, convs, biases) in the exported checkpoint."""

    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"export.dtype must be one of {DTYPES}, got {self.dtype!r}")


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

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def section_fingerprint(self, *names: str) -> str:
        """Hash of the named sections (stage outputs are reused only while these are unchanged)."""
        data = {n: self.to_dict()[n] for n in names}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _build(cls, data: Any, path: str):
    """Build dataclass `cls` from a mapping, recursing into dataclass fields; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'recipe'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown recipe key {where}{unknown[0]!r}; known keys{' of ' + path if path else ''}: "
                         f"{sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{path}.{name}" if path else name)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad value in {path or 'recipe'}: {err}") from err


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data, "")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; see recipes/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from err
    return recipe_from_dict(data or {})


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
