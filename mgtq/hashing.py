"""Content hashes: a file's sha256 (`sha256_file`, read in blocks; `hashed_ahead` computes several side by side
in background threads while a load goes on) and the short fingerprints over a model's transformer files
(`model_fingerprint`) or over named files and folders (`files_fingerprint`) by which stages, exports and
benchmark caches notice that what they were made from has changed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 (16 hex digits) over a pipeline's transformer config and weight files.

    What results computed from a model depend on: SCQ stages, exports and benchmark caches use it to
    notice that the model they were made from has changed.
    """
    h = hashlib.sha256()
    folder = Path(model_dir) / "transformer"
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode())
        _feed_file(h, path)
    return h.hexdigest()[:16]


def files_fingerprint(parts: dict[str, str | os.PathLike]) -> str:
    """sha256 (16 hex digits) over named files and folders: every regular file's name and bytes.

    `parts` maps a name to a file or folder ({"vqvae": DIR/vqvae, "prompts": FILE}); a missing one
    counts as missing. Hidden names (mgtq's temporary files, editors' swap files) are left out.
    """
    h = hashlib.sha256()
    for name, root in sorted(parts.items()):
        root = Path(root)
        files = _regular_files(root)
        h.update(f"{name}:{len(files)}\n".encode())
        for path in files:
            h.update(f"{path.relative_to(root).as_posix() if path != root else ''}:{path.stat().st_size}\n".encode())
            _feed_file(h, path)
    return h.hexdigest()[:16]


def _regular_files(root: Path) -> list[Path]:
    """`root` if it is a file; else the files under it, hidden names left out, links not followed, in the order
    of their relative path's components compared as strings: the order of POSIX paths, on every system (Windows
    paths compare without case), so that a run folder moved between systems keeps its fingerprints."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted((p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).parts)

def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weights files are gigabytes); inside `hashed_ahead`, the
    digest it computes for the file as it still is (waiting for it if it is still being read)."""
    path = Path(path)
    ahead = getattr(_AHEAD, "pending", None)
    future = ahead.get(_path_id(path)) if ahead else None
    keyed = future.result() if future is not None else None
    if keyed is not None and keyed[0] == _file_key(path):
        return keyed[1]
    return _feed_file(hashlib.sha256(), path).hexdigest()


# .pending: {resolved path: future of (file key, sha256) or None} of the calling thread's `hashed_ahead` blocks
_AHEAD = threading.local()


@contextlib.contextmanager
def hashed_ahead(paths: Iterable[str | os.PathLike]):
    """Hash `paths` in background threads, side by side, for the `sha256_file` calls inside the block.

    A load verifies several big files (the transformer's, the text encoder's) one check after another and loads
    components between them; sha256 and file reads release the GIL, so the hashes run beside each other and
    beside that work (benchmarks/bench_load.py --compare-one-by-one). A check
    waits only for its own file's hash. A file is matched by path, inode, size and modification and change times:
    one changed after it was hashed ahead is hashed again. Missing or unreadable files are left to the checks,
    whose errors name them. Leaving the block stops the hashes nobody asked for.
    """
    files = list(dict.fromkeys(Path(p) for p in paths if Path(p).is_file()))
    outer = getattr(_AHEAD, "pending", None)
    if not files:
        yield
        return
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1, 8), thread_name_prefix="mgtq-hash")
    try:
        pending = {_path_id(p): pool.submit(_hash_keyed, p, stop) for p in files}
        _AHEAD.pending = {**(outer or {}), **pending}
        yield
    finally:
        _AHEAD.pending = outer
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _path_id(path: Path) -> str:
    return str(path.resolve())


def _file_key(path: Path) -> tuple | None:
    """What tells a file from a changed one: path, inode, size, and the modification and change times (a write
    can restore the first, `os.utime`, not the second)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (_path_id(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_keyed(path: Path, stop: threading.Event | None = None) -> tuple[tuple, str] | None:
    """(key, sha256) of `path`, or None where it changed while it was read, cannot be read or `stop` was set."""
    key = _file_key(path)
    try:
        h = _feed_file(hashlib.sha256(), path, stop) if key is not None else None
    except OSError:
        return None
    if h is None or (stop is not None and stop.is_set()) or _file_key(path) != key:
        return None
    return key, h.hexdigest()


def _feed_file(h, path: Path, stop: threading.Event | None = None):
    """`h` fed with the file's bytes, 16 MiB at a time; None where `stop` was set before the end."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            if stop is not None and stop.is_set():
                return None
            h.update(chunk)
    return h
