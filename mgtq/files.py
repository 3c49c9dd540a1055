"""mgtq's one file writer and its recovery: every file and folder mgtq writes is written whole beside its
target and renamed into place (`atomic_file`, `atomic_write_text`, `write_json`, `save_safetensors`; folders:
`atomic_directory`, `atomic_entries` for a folder that holds files of the user's), never in place of a device,
FIFO, socket or link (a link is written through: `writable_file`; `describe_path` says what is there), and what
a killed writer left beside its target is cleaned up or restored (`recover_directory`, `recover_atomic_target`);
`read_json` reads back what `write_json` wrote."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import stat
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # only an annotation: writing files does not import torch (`mgtq --help`, the CLI's checks)
    import torch

_WINDOWS = os.name == "nt"


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
    pipeline's `model_index.json` comes last). Where the OS cannot exchange entries in one step, the entries are
    replaced all or none (`_replace_all`). A new or empty `target` is swapped in whole (`atomic_directory`).
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
        pairs = [(entry, _through_link(target / entry.name)) for entry in written]
        for _, place in pairs:
            recover_directory(place)
        if _renameat2() is None:
            _replace_all(pairs)
        else:
            for entry, place in pairs:
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


def _replace_all(pairs: list[tuple[Path, Path]]) -> None:
    """Put each finished entry `new` at its `place`, all or none, where entries cannot be exchanged in one step.

    Windows refuses to rename a file in use, or a folder holding one, and a loaded pipeline keeps its weights
    mapped: replaced one by one, a save into the folder it was loaded from would stop half-way, leaving new
    parts beside a `model_index.json` whose checksums are the old ones. So every old entry is first renamed
    aside; if one cannot be, those already moved go back before anything new is in place, and the error says
    so. A kill between the renames leaves `.old` debris, which the next write's `recover_directory` puts back
    where nothing new took its place.
    """
    aside: list[tuple[Path, Path]] = []  # (where it went, where it was)
    try:
        for _, place in pairs:
            if place.exists() or place.is_symlink():
                old = _debris_name(place, "old")
                os.replace(place, old)
                aside.append((old, place))
    except OSError as err:
        _move_back(aside)
        if isinstance(err, PermissionError):
            raise PermissionError(f"{place} is in use (loaded by a running program?): close it and "
                                  f"retry; nothing in {place.parent} was replaced") from err
        raise
    placed: list[tuple[Path, Path]] = []
    try:
        for new, place in pairs:
            os.replace(new, place)
            placed.append((place, new))
    except BaseException:
        _move_back(aside + placed)  # last first: the new entries back out, then the old ones back in
        raise
    for old, _ in aside:
        _remove(old)


def _move_back(moves: list[tuple[Path, Path]]) -> None:
    """Undo renames ((where it went, where it was)), last first. One that fails leaves its entry where it went:
    an `.old` copy that recover_directory puts back at the next write, a new entry that it deletes."""
    for went, was in reversed(moves):
        with contextlib.suppress(OSError):
            os.replace(went, was)


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
    """Whether the writer whose pid a debris name carries is a running process; True where that cannot be told
    (its debris is then left alone, never deleted under a live writer)."""
    if pid == os.getpid():
        return True
    if _WINDOWS:  # os.kill(pid, 0) there sends CTRL_C_EVENT (signal 0) to the pid's console group
        import psutil

        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process; anything else: unknown
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


def remove_directory(target: str | os.PathLike) -> None:
    """Remove a folder mgtq wrote, all or nothing under its name: it is first renamed to a temporary sibling, so a
    process killed while deleting leaves debris that `recover_atomic_target` removes, never half a folder that a
    reader would take for the whole."""
    target = Path(target)
    if not target.is_dir() or target.is_symlink():
        return
    aside = _debris_name(target, "tmp")
    os.replace(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


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


def existing_parent(path: Path) -> Path:
    """The nearest folder above `path` that exists (where a write to `path` would create what is missing);
    ValueError when not even its root does: on Windows a drive letter that is not there, or a network share that
    cannot be reached (the parent of such a root is the root itself, so climbing on would never end)."""
    parent = path.parent
    while not parent.exists():
        if parent.parent == parent:
            raise ValueError(f"{parent} does not exist (a drive that is not there, or a network share that cannot "
                             "be reached?); choose a path on a drive that exists")
        parent = parent.parent
    return parent


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
