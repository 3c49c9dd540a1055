"""Training state on disk in safetensors and JSON only: model, optimizer, scheduler, RNG, grad scaler.

`accelerator.save_state` writes the optimizer, the RNG states and the grad scaler with pickle
(`optimizer.bin`, `random_states_0.pkl`, `scaler.pt`), and `load_state` unpickles them: a state
folder someone else handed you could run code. Here every tensor goes to a safetensors file and
everything else to JSON. `state.json` lists the sha256 of exactly the files the state is made of
(the caller's own files, e.g. its step, among them) and carries a digest of its own content (the
optimizer's settings, the scheduler's state, the file list), all checked before anything is read,
so a corrupt or altered state is refused with a message rather than loaded.

    save_training_state(folder, accelerator, model, optimizer, scheduler, extra)  # main process, a fresh folder
    load_training_state(folder, accelerator, model, optimizer, scheduler, extra)  # every process
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from mgtq.files import read_json, save_safetensors, write_json
from mgtq.hashing import sha256_file

STATE_FILE = "state.json"
FORMAT = "mgtq-training-state"
VERSION = 2  # 2: the digest of state.json's content; the files listed exactly, the caller's among them
DIGEST_KEY = "digest"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


class OutdatedTrainingState(ValueError):
    """A state an mgtq before format 2 wrote: no digest covers its metadata, so it is never loaded."""


def save_training_state(folder: Path, accelerator, model, optimizer, scheduler=None, extra: tuple[str, ...] = ()
                        ) -> None:
    """Write the state of a prepared (model, optimizer, scheduler) and this process's RNGs into `folder`.

    `extra`: files the caller has already written into `folder` (its step, say), covered by the same checks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = accelerator.unwrap_model(model).state_dict()
    _save_tensors(folder / "model.safetensors", weights)
    optimizer_tensors, optimizer_meta = _split_optimizer(optimizer.state_dict())
    _save_tensors(folder / "optimizer.safetensors", optimizer_tensors)
    rng_tensors, rng_meta = _rng_state()
    _save_tensors(folder / "rng.safetensors", rng_tensors)
    scaler = getattr(accelerator, "scaler", None)
    meta = {"format": FORMAT, "version": VERSION, "optimizer": optimizer_meta, "rng": rng_meta,
            "scheduler": _plain(scheduler.state_dict()) if scheduler is not None else None,
            "scaler": _plain(scaler.state_dict()) if scaler is not None else None,
            "files": {name: sha256_file(folder / name) for name in _needed_files(extra)}}
    write_json(folder / STATE_FILE, {**meta, DIGEST_KEY: _digest(meta)})


def load_training_state(folder: Path, accelerator, model, optimizer, scheduler=None, extra: tuple[str, ...] = (),
                        meta: dict | None = None) -> None:
    """Restore what :func:`save_training_state` wrote; a missing, corrupt or altered file is an error, a
    state of an older format an :class:`OutdatedTrainingState`. `meta`: what :func:`checked_meta` returned
    for this folder when the caller checked it first (its files are not hashed again)."""
    folder = Path(folder)
    meta = meta if meta is not None else checked_meta(folder, extra)
    accelerator.unwrap_model(model).load_state_dict(load_file(str(folder / "model.safetensors")))
    optimizer.load_state_dict(_join_optimizer(load_file(str(folder / "optimizer.safetensors")), meta["optimizer"]))
    if (scheduler is None) != (meta["scheduler"] is None):
        raise ValueError(f"{folder}: the saved state {'has' if meta['scheduler'] is not None else 'has no'} LR "
                         "scheduler state but this run does not match; delete the folder to start over")
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and meta["scaler"] is not None:
        scaler.load_state_dict(meta["scaler"])
    _set_rng_state(load_file(str(folder / "rng.safetensors")), meta["rng"])


def checked_meta(folder: Path, extra: tuple[str, ...] = ()) -> dict:
    """state.json's content, once it matches its digest, lists exactly the state's files (`extra`: the
    caller's) and every one matches its sha256; else an error saying what to do."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no mgtq training state ({STATE_FILE} is missing); delete the "
                                "folder to start the training over")
    redo = f"delete {folder} to start this training over, or restore the folder from a copy"
    try:
        meta = read_json(path)
    except ValueError as err:
        raise ValueError(f"{path} cannot be read ({err}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mgtq training state; delete {folder} to start over")
    if meta.get("version") == 1:
        raise OutdatedTrainingState(f"{path}: a training state of format 1, whose metadata no digest covers, "
                                    f"written by an earlier mgtq; delete {folder} to start this training over")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: not an mgtq training state of version {VERSION}; delete {folder} to start over")
    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    if meta.get(DIGEST_KEY) != _digest(body):
        raise ValueError(f"{path} does not match the digest written with it (its optimizer, scheduler or file "
                         f"list was altered or damaged); {redo}")
    files = body.get("files")
    problem = _file_list_problem(files, _needed_files(extra))
    if problem:
        raise ValueError(f"{path}: {problem}; {redo}")
    for name, digest in files.items():
        file = folder / name
        if not file.is_file() or sha256_file(file) != digest:
            raise ValueError(f"{file} is missing or does not match the sha256 recorded in {STATE_FILE} (corrupt or "
                             f"altered); {redo}")
    return meta


def _needed_files(extra: tuple[str, ...]) -> tuple[str, ...]:
    return (*TENSOR_FILES, *sorted(set(extra) - set(TENSOR_FILES)))


def _file_list_problem(files, needed: tuple[str, ...]) -> str | None:
    """What is wrong with state.json's {file: sha256} list given the files the state needs; None when nothing."""
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return "its 'files' is not a map of file names to sha256 digests"
    missing, unknown = [n for n in needed if n not in files], sorted(set(files) - set(needed))
    if missing:
        return f"it records no sha256 for {', '.join(missing)}"
    if unknown:
        return f"it records files this training state is not made of: {', '.join(unknown)}"
    return None


def _digest(meta: dict) -> str:
    """sha256 of the JSON content, independent of how it is laid out (JSON reads back floats exactly)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # clone: parameters may share storage (tied weights) and safetensors refuses shared tensors
    save_safetensors({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, path)


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state dict → (tensors "state.<param>.<name>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for param, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{name}"] = value
            else:
                scalars[f"{param}.{name}"] = _plain(value)
    return tensors, {"scalars": scalars, "param_groups": _plain(state_dict["param_groups"]),
                     "params": sorted(state_dict["state"])}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {int(p): {} for p in meta["params"]}
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state[int(param)][name] = value
    for key, value in meta["scalars"].items():
        param, name = key.split(".", 1)
        state[int(param)][name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _plain(value):
    """Python scalars, lists and dicts only (tuples become lists): what JSON keeps exactly."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if torch.is_tensor(value):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a training state")


def keeps_global_rng(train):
    """`train` with the caller's global RNG states (torch, CUDA, numpy, python) given back when it returns or
    raises. A resumed state sets the ones it saved, so that a resumed run draws as the uninterrupted one would,
    for the run only: the caller of a library function keeps its own streams."""
    @functools.wraps(train)
    def run(*args, **kwargs):
        tensors, meta = _rng_state()
        try:
            return train(*args, **kwargs)
        finally:
            _set_rng_state(tensors, meta)
    return run


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, python_gauss = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), python_gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = meta["python"]
    random.setstate((version, tuple(internal), python_gauss))
