"""`mgtq quantize`: post-training quantization of a pipeline folder into an mgtq checkpoint (no QAT).

    load → mgtq.quantize_(pipe, config, calibration_prompts=…) → pipe.save_pretrained(out)

The checkpoint goes through the one writer (`mgtq.quantization.checkpoint`, via save_pretrained) and,
like `mgtq export`, only to a new path, or over an existing mgtq checkpoint with overwrite=True.
For SCQ proper (QAT on the model's own images, then the secondary A8 rule) use `mgtq calibrate`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mgtq.export import check_checkpoint_target
from mgtq.files import atomic_directory
from mgtq.quantization.api import CONFIGS, SCQConfig, W4A8Config, W4A16Config

__all__ = ["config_from_name", "calibration_prompts", "quantize_pipeline"]


def config_from_name(name: str, group_size: int | None = None):
    """The quantize_ config of a CLI name: "w4a16", "w4a8" or "scq" (group_size for the A16 layers)."""
    if name not in CONFIGS:
        raise ValueError(f"--config must be one of {sorted(CONFIGS)}, got {name!r}")
    if name == "w4a8":
        if group_size is not None:
            raise ValueError("--group-size does not apply to w4a8 (int8 activations need per-channel int4 weights); "
                             "use scq or w4a16 for grouped weights")
        return W4A8Config()
    return W4A16Config(group_size=group_size) if name == "w4a16" else SCQConfig(group_size=group_size)


def calibration_prompts(count: int) -> list[str]:
    """`count` ShapeBench validation prompts (never the test split that `mgtq eval` reports), round-robin over
    the categories as SCQ's synthesis takes them: the list is category after category, so its first 32 were
    all one-object prompts, and the activation scales never saw two objects, colours or counts."""
    from mgtq.evaluation import interleave_categories
    from mgtq.shapes.shapebench import CATEGORIES, DEFAULT_PER_CATEGORY, shapebench_prompts

    most = len(CATEGORIES) * DEFAULT_PER_CATEGORY
    if not 1 <= count <= most:
        raise ValueError(f"--calibration-prompts must be between 1 and {most}, got {count}")
    items = interleave_categories(shapebench_prompts(-(-count // len(CATEGORIES)), split="val"))
    return [item.prompt for item in items[:count]]


def check_target(out: str | Path, overwrite: bool = False, sources: dict[str, str | Path | None] | None = None) -> None:
    """Raise (nothing touched) unless quantize may write `out` (mgtq.export.check_checkpoint_target); `sources`
    ({what: path}: the model, a separate text encoder) are not to be touched."""
    # a loaded module given for the text encoder is no folder to protect
    protected = {what: Path(path) for what, path in (sources or {}).items() if isinstance(path, (str, os.PathLike))}
    check_checkpoint_target(out, overwrite, protected, "quantize")


def quantize_pipeline(model: str | Path, config, out: str | Path, calibration: list[str] | None = None,
                      overwrite: bool = False, progress: bool = True, **load_kwargs) -> dict[str, str]:
    """Load the float pipeline `model`, quantize its transformer with `config`, write `out`; returns
    {layer: module class}. W4A8/SCQ calibrate activations on `calibration` prompts."""
    from mgtq.pipeline import load
    from mgtq.quantization.api import quantize_

    sources = {"the source model": model, "the text encoder": load_kwargs.get("text_encoder")}
    check_target(out, overwrite, sources)
    pipe = load(model, progress=progress, **load_kwargs)
    needs = not isinstance(config, W4A16Config)
    done = quantize_(pipe, config, calibration_prompts=calibration if needs else None)
    check_target(out, overwrite, sources)  # again: calibration takes a while, the folder may have appeared meanwhile
    # one swap of the whole folder: a checkpoint written over (--overwrite) and stopped part-way is the old one,
    # never a mix of old and new parts (save_pretrained replaces a folder's entries one at a time)
    with atomic_directory(out, keep_others=True) as tmp:
        pipe.save_pretrained(tmp, progress=progress)
    return done
