"""Small shared helpers: atomic writes, JSON files, dtype names, seeds, generators, module surgery."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, get_args

import torch


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True, keep_others: bool = False):
    """Yield a temporary sibling folder; on success it replaces `target`.

    keep_others: entries of the folder being replaced that the new one does not have (a clone's `.git`, a model
    card) are carried into it first, as hard links (copies where the file system has none), so the whole
    folder is still swapped in one step and nothing of the user's is lost.

    On any exception the temporary folder is removed and `target` is left as it was, so a reader
    never sees a half-written folder. The swap exchanges the two folders in one step where the OS can
    (`_swap_in`), so `target` is never missing; elsewhere it renames `target` to a hidden `.old` sibling and the
    new folder into place. A process killed along the way leaves debris that `recover_directory` (called first,
    every time) cleans up or, if `target` went missing, restores.
    Files and folders get the user's normal permissions (umask), not a temporary folder's 0700.
    """
    target = _through_link(Path(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise ValueError(f"{target} is {_kind(target)}, not a folder; mgtq replaces only folders it wrote: "
                         "choose another path")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another path or remove it first")
    tmp = _debris_name(target, "tmp")
    tmp.mkdir()  # mode 0o777 & ~umask
    try:
        yield tmp
        _normal_permissions(tmp)  # before the carried entries: they are the user's files, modes and all
        if keep_others and target.is_dir():
            for entry in sorted(target.iterdir()):
                if not (tmp / entry.name).exists() and not (tmp / entry.name).is_symlink():
                    _link_copy(entry, tmp / entry.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)


def _link_copy(source: Path, dest: Path) -> None:
    """`source` at `dest` without copying data: hard links for files (a copy across file systems or where
    links are refused), links as links, folders recreated."""
    def link(src, dst):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, dest, symlinks=True, copy_function=link)
    else:
        link(source, dest)


@contextlib.contextmanager
def atomic_entries(target: str | os.PathLike, stale: Callable[[str], bool] | None = None):
    """`save_pretrained`'s writer, for a folder that may hold files of the user's (a clone of a model repo with
    its `.git` and model card, say): yield a temporary folder; on success each of its entries replaces the entry
    of that name in `target`, and entries of `target` that `stale(name)` says an earlier save left (and this
    one did not write) are removed. Nothing else in `target` is touched, as with diffusers' `save_pretrained`.

    Each entry is replaced atomically (written whole beside it, then renamed in; folders before files, so a
    pipeline's `model_index.json` comes last). A new or empty `target` is swapped in whole (`atomic_directory`).
    """
    target = _through_link(Path(target))
    if not target.is_dir() or not any(target.iterdir()):
        with atomic_directory(target) as tmp:
            yield tmp
        return
    recover_directory(target)
    tmp = _debris_name(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _normal_permissions(tmp)
        written = sorted(tmp.iterdir(), key=lambda p: (p.is_file(), p.name))
        for entry in written:
            place = target / entry.name
            if (place.exists() or place.is_symlink()) and place.is_dir() != entry.is_dir():
                raise ValueError(f"{place} is {_kind(place)}, where the save writes a "
                                 f"{'folder' if entry.is_dir() else 'file'}; move it away or save elsewhere")
        for entry in written:
            place = _through_link(target / entry.name)
            recover_directory(place)
            _swap_in(entry, place)
        names = {entry.name for entry in written}
        for path in target.iterdir():
            if stale is not None and path.name not in names and stale(path.name):
                _remove(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, place: Path) -> None:
    """Put the finished entry `new` at `place` and delete what was there.

    A file is renamed over in one step. A folder cannot be (rename refuses a non-empty target), so the two are
    exchanged in one step where the OS can (`_exchange`) and the old one, now at `new`'s hidden name, deleted:
    a reader of `place` finds the old folder or the new one, never neither. Elsewhere the old folder is first
    renamed to a hidden `.old` sibling, which `recover_directory` puts back if a kill comes before the new one
    is in place.
    """
    if not (place.exists() or place.is_symlink()) or (new.is_file() and not place.is_dir()):
        os.replace(new, place)
        return
    if _exchange(new, place):
        _remove(new)  # the old entry; a kill before this leaves `.tmp` debris that recover_directory deletes
        return
    old = _debris_name(place, "old")
    os.replace(place, old)
    os.replace(new, place)
    _remove(old)


_AT_FDCWD = -100  # linux/fcntl.h
_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2():
    """glibc's renameat2 (Linux 3.15+, glibc 2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries at `a` and `b` atomically (renameat2 RENAME_EXCHANGE); False where the OS or the file
    system cannot (no renameat2, or a file system without exchange), and the caller renames twice instead."""
    renameat2 = _renameat2()
    return renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                               _RENAME_EXCHANGE) == 0


def recover_directory(target: str | os.PathLike) -> None:
    """Clean what killed writers of `target` left: their `.tmp` folders are deleted, and their `.old`
    copies deleted too, unless `target` is missing, in which case the newest `.old` copy is put back.

    Debris of a writer that is still running (its pid is in the name) is left alone.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    olds = []
    for path, kind, pid in _debris(target):
        if writer_alive(pid):
            continue
        if kind == "tmp":
            _remove(path)
        else:
            olds.append(path)
    olds.sort(key=lambda p: p.stat().st_mtime)
    if olds and not (target.exists() or target.is_symlink()):
        os.replace(olds.pop(), target)
    for path in olds:
        _remove(path)


def _debris_name(target: Path, kind: str, suffix: str = "") -> Path:
    """The hidden sibling a writer of `target` works in: `.NAME.tmp-PID-XXXXXXXX[suffix]` (or `.old-`)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _debris(target: Path):
    """(path, kind, pid) of each sibling named exactly as `_debris_name` names them: nothing else is
    mgtq's, so nothing else is ever deleted (a user's `.NAME.swp` or `.NAME.tmp-backup` stays)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}(?:{re.escape(target.suffix)})?")
    for name in sorted(os.listdir(target.parent)):
        match = pattern.fullmatch(name)
        if match:
            yield target.parent / name, match[1], int(match[2])


def writer_alive(pid: int) -> bool:
    """Whether the writer whose pid a debris name carries is a running process."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _normal_permissions(root: Path) -> None:
    """Give `root` and everything under it the mode a plain mkdir/open would (0o777/0o666 minus the
    umask): libraries write through private temporary files (0600) that would otherwise leak through."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def recover_atomic_target(target: str | os.PathLike) -> None:
    """Clean what a killed `atomic_directory(target)` left beside `target`; never lose its last copy.

    A kill while the new folder was written leaves `.NAME.tmp-*` (incomplete: removed); a kill between
    the two renames of the swap leaves only `.NAME.old-*` (the last complete copy: renamed back);
    a kill while the old copy was deleted leaves part of it (removed).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    found = list(_debris(target))
    olds = sorted((p for p, kind, _ in found if kind == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
    for debris in olds + [p for p, kind, _ in found if kind == "tmp"]:
        if debris.is_dir():
            shutil.rmtree(debris, ignore_errors=True)
        else:
            debris.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary sibling path to write; on success it replaces `path`, on failure it is removed.

    The one way mgtq writes a file (JSON, PNG, safetensors). A symlink is resolved once and the file
    written at its real path, so the link stays a link. A device, FIFO, socket or folder at `path` is
    refused before anything is written: a rename would replace it (with `--json /dev/null`, the
    system's /dev/null). The file gets normal permissions (umask), not a temporary file's 0600.
    """
    path = writable_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = _debris_name(path, "tmp", path.suffix)  # the suffix lets writers (PIL, matplotlib) see the format
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def writable_file(path: str | os.PathLike) -> Path:
    """Where a file write to `path` lands: its real path through a symlink; ValueError for a target
    that is not a regular file (device, FIFO, socket, folder), which mgtq never replaces."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise ValueError(f"{path} is {_kind(path)}; mgtq writes regular files only and never replaces anything "
                         "else: give the path of a file")
    return _through_link(path)


def _through_link(path: Path) -> Path:
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def describe_path(path: str | os.PathLike) -> str:
    """What is at `path`, for messages: "does not exist", "is a folder", "is a FIFO (named pipe)", …"""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return "does not exist"
    return f"is {_kind(path)}"


def _kind(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken symbolic link" if path.is_symlink() else "missing"
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "a special file"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A safetensors file written atomically; a failed write (a full disk) is an OSError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:  # its I/O errors are not OSErrors
            raise OSError(f"could not write {path} ({str(err)[:200]}); free some disk space and rerun") from None


def write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    """The data `write_json` wrote, read back through mgtq's one bounded reader (`mgtq.config.read_data`) as
    JSON whatever the file's suffix; callers check its shape with their own messages (a model index, a run
    record). Settings files a user writes are read with `mgtq.config.read_mapping` instead."""
    from mgtq.config import read_data

    return read_data(path, fmt="json")


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
            h.update(f"{path.relative_to(root) if path != root else ''}:{path.stat().st_size}\n".encode())
            _feed_file(h, path)
    return h.hexdigest()[:16]


def _regular_files(root: Path) -> list[Path]:
    """`root` if it is a file; else the files under it, sorted, hidden names left out, links not followed."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def non_finite_tensor(module: torch.nn.Module) -> str | None:
    """The state-dict key of `module`'s first floating-point tensor holding NaN or ±inf (meta ones skipped), or
    None: what a save refuses to write and a load refuses to read."""
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            return key
    return None


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element of the floating-point `tensor` is NaN or ±inf.

    min and max carry any NaN (they propagate it) and any infinity, so one aminmax pass decides; an elementwise
    isfinite().all() writes a bool tensor and reads it again, many times slower on CPU half types (seconds per
    load for a billion-parameter transformer: benchmarks/bench_load.py).
    """
    if tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no aminmax or isfinite kernel on the CPU; float16 holds every value
        return all(all_finite(chunk.to(torch.float16)) for chunk in tensor.reshape(-1).split(1 << 24))
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


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


def per_sample_generators(
    batch_size: int,
    seed: int | list[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device = "cpu",
) -> list[torch.Generator]:
    """One torch.Generator per sample, so each sample draws the same random numbers whatever shares its batch.

    seed s → generators seeded s, s+1, …; a list of seeds, or of generators on `device`, is used as given; a single
    generator on `device` is the first sample's, as in a list of one (diffusers' `generator=g` and `[g]` are the
    same image, and so are `G(s)` and `seed=s`), and the others' seeds are drawn from a copy of its state, so
    sample i draws the same numbers whatever the batch size. A generator on another device draws one seed per
    sample, and so does each generator of a list on another device (diffusers' `[torch.Generator("cpu")
    .manual_seed(i) …]` for a CUDA pipeline): the sampler draws from them every step, which on the CPU would mean
    copying each step's probabilities to the host; nothing → seed 0.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} samples")
        wrong = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if wrong:
            raise TypeError(f"generator must be a torch.Generator or a list of them, got a list holding {wrong[0]}; "
                            "pass integer seeds as seed=")
        if all(_same_device(g.device, torch.device(device)) for g in generator):
            return list(generator)
        return [_generator_on(device, _draw_seeds(g, 1)[0]) for g in generator]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}; "
                        "pass integer seeds as seed=")
    if isinstance(generator, torch.Generator):
        if _same_device(generator.device, torch.device(device)):
            copy = torch.Generator(device=generator.device).set_state(generator.get_state())
            return [generator] + [_generator_on(device, s) for s in _draw_seeds(copy, batch_size)[1:]]
        seeds = _draw_seeds(generator, batch_size)
    elif isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"got {len(seed)} seeds for {batch_size} samples")
        seeds = list(seed)
    else:
        base = 0 if seed is None else int(seed)
        seeds = [base + i for i in range(batch_size)]
    return [_generator_on(device, s) for s in seeds]


def _draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """`count` seeds drawn from `generator`, on its own device (a CUDA generator cannot draw a CPU tensor), one
    draw each: seed i is then the same whatever the count (one draw of `count` values need not begin with the
    values of a shorter one: CUDA's Philox spreads a long draw over threads)."""
    draws = [torch.randint(0, 2**62, (1,), generator=generator, device=generator.device) for _ in range(count)]
    return torch.cat(draws).tolist() if draws else []


def _generator_on(device: str | torch.device, seed: int) -> torch.Generator:
    """A generator on the device the sampler runs on: drawing there keeps the noise and the sampling on it."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 alike (an index left out is the current device)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


# ------------------------------------------------------------------------------------ dtype names
# One spelling table for every place a dtype is named (CLI flags, recipes, manifests, bench formats).
# The canonical names, as a config annotation (recipes, manifests), and the short ones the CLI's --dtype offers:
# the same three dtypes, in the same order.
FloatDtype = Literal["float32", "bfloat16", "float16"]
ShortDtype = Literal["fp32", "bf16", "fp16"]
SHORT_DTYPES = get_args(ShortDtype)
DTYPES: dict[str, torch.dtype] = {name: dtype for names in (get_args(FloatDtype), SHORT_DTYPES)
                                  for name, dtype in zip(names, (torch.float32, torch.bfloat16, torch.float16))}
DTYPE_NAMES: dict[torch.dtype, str] = {DTYPES[name]: name for name in get_args(FloatDtype)}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from a name ("bf16", "bfloat16", …) or a torch floating dtype a model can compute in; None stays
    None; errors list the choices. fp8 dtypes are storage-only (diffusers' `enable_layerwise_casting`)."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if not name.is_floating_point or name.itemsize < 2:
            raise ValueError(f"dtype {name} is not one a model computes in; use torch.float32, torch.bfloat16 or "
                             "torch.float16 (fp8 storage: transformer.enable_layerwise_casting)")
        return name
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a float dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"mgtq stores float tensors as {sorted(DTYPE_NAMES.values())}, not {dtype}") from None


# ------------------------------------------------------------------------------------------ seeds
_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings (SplitMix64-style avalanche over a stable hash).

    Stable across processes and Python versions (unlike `hash()`), and nearby inputs give unrelated
    seeds, so one base seed can be split per step, layer, block or process.
    """
    h = 0x9E3779B97F4A7C15
    for part in parts:
        if isinstance(part, str):
            part = int.from_bytes(hashlib.sha256(part.encode()).digest()[:8], "little")
        elif isinstance(part, bool) or not isinstance(part, int):
            raise TypeError(f"derive_seed takes ints and strings, got {type(part).__name__}")
        h = ((h ^ (part & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


# ---------------------------------------------------------------------------------- module surgery
def cast_module(module: torch.nn.Module, **change) -> None:
    """`module.to(**change)` without diffusers 0.42's warning that modules "should be kept in float32: []": it warns
    on any dtype, even where no module is to be kept (`_keep_in_fp32_modules` empty), and a user then reads
    advice meant for other models on every documented `pipe.to(dtype)`."""
    import logging

    def real(record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()

    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addFilter(real)
    try:
        module.to(**change)
    finally:
        logger.removeFilter(real)


def unwrapped(module):
    """The module under `torch.compile(module)`'s wrapper (its `_orig_mod`), or `module` itself: what holds the
    state-dict keys and submodule names without the wrapper's `_orig_mod.` prefix."""
    return getattr(module, "_orig_mod", module)


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace the submodule at dotted `name` ("blocks.0.attn.to_q") by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ----------------------------------------------------------------------------- micro-conditions
def micro_conditions(width: int, height: int, aesthetic_score: float = 6.0, crop_top: int = 0,
                     crop_left: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Meissonic's micro-conditions (1, 5): [orig_w, orig_h, crop_top, crop_left, aesthetic score]."""
    return torch.tensor([[width, height, crop_top, crop_left, aesthetic_score]], dtype=torch.float32, device=device)
