"""Small shared helpers: atomic writes, JSON files, generators."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary sibling folder; on success it replaces `target` in one rename.

    On any exception the temporary folder is removed and `target` is left as it was, so a reader
    never sees a half-written folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another path or remove it first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it may be truncated — recreate it") from err


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 (16 hex digits) over a pipeline's transformer config and weight files.

    What results computed from a model depend on: SCQ stages, exports and benchmark caches use it to
    notice that the model they were made from has changed.
    """
    h = hashlib.sha256()
    folder = Path(model_dir) / "transformer"
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def per_sample_generators(
    batch_size: int,
    seed: int | list[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device = "cpu",
) -> list[torch.Generator]:
    """One torch.Generator per sample, so each sample is reproducible whatever shares its batch.

    seed s → generators seeded s, s+1, …; a list of seeds or generators is used as given; a single
    generator draws one seed per sample (deterministic given its state); nothing → seed 0.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} samples")
        return list(generator)
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
    elif isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"got {len(seed)} seeds for {batch_size} samples")
        seeds = list(seed)
    else:
        base = 0 if seed is None else int(seed)
        seeds = [base + i for i in range(batch_size)]
    device = torch.device(device)
    # CPU generators keep results identical across devices; CUDA ones are faster for CUDA sampling.
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
