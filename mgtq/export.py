"""`mgtq export RUN --out DIR`: a finished SCQ run → a quantized pipeline checkpoint.

checkpoint/
  model_index.json, vqvae/, text_encoder/, tokenizer/, scheduler/   copied from the source model
  transformer/                                                       mgtq.quantization.checkpoint's format

text_encoder/ is the recipe's `text_encoder:` where it names one (the official Meissonic setup keeps CLIP apart):
the encoder the calibration conditioned on, so the checkpoint loads with it and nothing else; only what the loader
reads of that folder is copied (config.json and the safetensors weights).

The seam with SCQ is `quantize_from_run(run) -> (model, provenance)`: the real W4/W4A8 transformer
and where it came from (source model and fingerprint, A8 selection, recipe). The checkpoint's
`Manifest` is built by `mgtq.quantization.checkpoint.describe(model, provenance)`, which reads the
layers and float dtype off the model itself.

Export writes only where it may: a new path, or (with `overwrite=True`) an existing mgtq
checkpoint, replaced atomically. It never writes over the run folder, the source model, or any
other existing file or folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from mgtq.files import atomic_directory, existing_parent, read_json, write_json
from mgtq.quantization import checkpoint
from mgtq.components import CHECKSUMS_KEY, PIPELINE_COMPONENTS, pipeline_checksums


def is_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` is an mgtq quantized pipeline checkpoint (what `mgtq export` writes)."""
    folder = Path(folder)
    try:
        return (folder / "model_index.json").is_file() and checkpoint.is_quantized(folder / "transformer")
    except ValueError:  # looks quantized but is incomplete: not something export may silently replace
        return False


def check_no_overlap(out: str | Path, protected: dict[str, Path]) -> None:
    """Refuse an `out` that is, holds or lies inside a folder a write must not touch ({what: path}), or that lies
    inside a component folder of a pipeline (files a load reads there would not be the component's, and its
    checksums would fail)."""
    out = Path(out).resolve()
    for what, path in protected.items():
        path = Path(path).resolve()
        if out == path or path in out.parents or out in path.parents:
            raise ValueError(f"--out {out} overlaps {what} ({path}); choose a new folder for the checkpoint")
    inside = next((parent for parent in out.parents
                   if parent.name in PIPELINE_COMPONENTS and (parent.parent / "model_index.json").is_file()), None)
    if inside is not None:
        raise ValueError(f"--out {out} is inside {inside}, a component folder of a pipeline; choose a folder "
                         "outside it")


def check_checkpoint_target(out: str | Path, overwrite: bool, protected: dict[str, Path], writer: str) -> None:
    """Raise (one line, nothing touched) unless a checkpoint may be written at `out`: a new path under a folder one
    may write in, or an mgtq checkpoint with overwrite=True that can be swapped for the new one (a folder written
    beside it, then renamed: its parent writable, itself no mount point); never overlapping `protected` ({what:
    path}) nor inside a pipeline's component folder. `writer` names the command in the messages. Both writers,
    `mgtq export` and `mgtq quantize`, ask here, from the CLI or from a script."""
    out = Path(out)
    check_no_overlap(out, protected)
    real = out.resolve()
    if not out.exists() and not out.is_symlink():
        try:
            existing = existing_parent(real)
        except ValueError as err:
            raise ValueError(f"--out {out}: {err}") from None
        if not existing.is_dir():
            raise ValueError(f"--out {out}: {existing} is a file, not a folder; choose a path inside a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {out}: no permission to write in {existing}; choose another path")
        return
    if not is_checkpoint(out):
        raise ValueError(f"--out {out} is an existing {'folder' if out.is_dir() else 'file'} that is not an mgtq "
                         f"checkpoint; {writer} writes only to a new path (or over an mgtq checkpoint with "
                         "--overwrite): choose a new path")
    if not overwrite:
        raise ValueError(f"--out {out} is an existing mgtq checkpoint; pass --overwrite to replace it, or choose a "
                         "new path")
    if os.path.ismount(real) or not os.access(real.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is replaced by a folder written beside it, but {real.parent} is not writable "
                         f"or {real} is a mount point; choose a new path")


def check_target(run: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Raise (one line, nothing touched) unless export may write `out`: see check_checkpoint_target; the run, its
    source model and the recipe's text encoder are not to be touched."""
    run = Path(run).resolve()
    protected = {"the calibration run": run}
    if (run / "run.json").is_file():
        model = read_json(run / "run.json").get("model")
        if isinstance(model, str):
            protected["the run's source model"] = Path(model).resolve()
    text_encoder = _recipe_text_encoder(run)
    if text_encoder is not None:
        protected["the recipe's text encoder"] = Path(text_encoder).resolve()
    check_checkpoint_target(out, overwrite, protected, "export")


def export_run(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`mgtq export RUN --out DIR [--overwrite]`: the quantized transformer plus the source model's other parts."""
    from mgtq.scq.quantize import quantize_from_run  # here: `mgtq quantize` imports this module, and needs no SCQ

    check_target(run, out, overwrite)
    model, provenance = quantize_from_run(run)
    manifest = checkpoint.describe(model, provenance)
    check_target(run, out, overwrite)  # again: quantizing takes a while, the folder may have appeared meanwhile
    return write_checkpoint(provenance["source_model"], model, manifest, out,
                            text_encoder=provenance["recipe"].get("text_encoder"))


def write_checkpoint(source: str | Path, model: torch.nn.Module, manifest: checkpoint.Manifest,
                     out: str | Path, text_encoder: str | Path | None = None) -> Path:
    """Write `out` atomically: the pipeline folder `source` with its transformer replaced by `model`, and its
    text encoder by the folder `text_encoder` where one is given."""
    source, out = Path(source), Path(out)
    replaced = {"transformer"} | ({"text_encoder"} if text_encoder is not None else set())
    try:
        with atomic_directory(out, keep_others=True) as tmp:  # over a checkpoint (--overwrite): the user's files stay
            for item in sorted(source.iterdir()):
                if item.name in replaced or item.name.startswith("."):
                    continue
                _copy(item, tmp / item.name, source.resolve())
            if text_encoder is not None:
                _copy_text_encoder(Path(text_encoder).resolve(), tmp / "text_encoder")
            checkpoint.save(model, manifest, tmp / "transformer")
            index = tmp / "model_index.json"
            if index.is_file():  # record what was written, so a damaged or swapped part never loads silently
                data = read_json(index)
                if text_encoder is not None:
                    data.setdefault("text_encoder", ["transformers", "CLIPTextModelWithProjection"])
                if "mgtq" not in data:  # an official source: its settings as mgtq reads them (step-index timesteps),
                    from mgtq.pipeline import read_settings  # which a quantized checkpoint must carry

                    data["mgtq"] = read_settings(source, verify=False).to_dict()
                write_json(index, {**data, CHECKSUMS_KEY: pipeline_checksums(tmp, data.get("mgtq"))})
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # the OS names the file copied from, not the one written
            raise OSError(err.errno, os.strerror(err.errno), str(out)) from None
        raise
    return out


def _recipe_text_encoder(run: Path) -> str | None:
    """The `text_encoder:` of the run's recipe, or None (none named, or no readable recipe: quantizing says why)."""
    from mgtq.scq.run import RunFolder

    try:
        return RunFolder(run).recipe().text_encoder
    except (OSError, ValueError):
        return None


def _copy_text_encoder(src: Path, dst: Path) -> None:
    """The files of text encoder folder `src` its loader (transformers, safetensors only) reads, into `dst`: its
    config.json and model.safetensors, or the shards its model.safetensors.index.json names. A downloaded CLIP
    folder also holds pickled and open_clip weights and hidden caches, which a checkpoint must not carry (nor hash
    at every load)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = read_json(index).get("weight_map", {}).values()
        files = [src / "config.json", index, *sorted({src / name for name in shards})]
    else:
        files = [src / "config.json", src / "model.safetensors"]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"the recipe's text_encoder {src} lacks {missing}: a transformers text encoder folder in "
                         "safetensors (save_pretrained) is what mgtq loads")
    dst.mkdir()
    for path in files:
        _copy(path, dst / path.name, src)


def _copy(src: Path, dst: Path, root: Path) -> None:
    """Copy contents only (the new files get the user's normal permissions, not the source's).

    Links are never followed out of the source model folder `root`, nor into folders (a link to a
    parent would recurse until the disk is full): a linked file is copied only when its target is a
    file inside `root`; anything else is refused, naming the link.
    """
    if src.is_symlink():
        target = src.resolve()
        inside = target == root or root in target.parents
        why = "outside the model folder" if not inside else None if target.is_file() else "not a file"
        if why:
            raise ValueError(f"{src} is a symbolic link to {target}, {why}; mgtq copies only the model folder's own "
                             "files: replace the link by a copy of the file (e.g. `cp -L`) or remove it")
        shutil.copyfile(target, dst)
    elif src.is_dir():
        dst.mkdir()
        for item in sorted(src.iterdir()):
            _copy(item, dst / item.name, root)
    elif src.is_file():
        shutil.copyfile(src, dst)
    else:
        raise ValueError(f"{src} is not a regular file (a device, FIFO or socket); remove it from the model folder")
