"""mgtq.files: atomic writes: nothing half-written, debris of killed writers recovered, normal permissions,
never over a device, FIFO or folder; links stay links."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mgtq.files import (atomic_directory, atomic_file, atomic_write_text, read_json, recover_atomic_target,
                        recover_directory, remove_directory, write_json)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_failure_inside_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_removal_killed_part_way_leaves_no_half_folder_and_its_debris_is_cleaned(tmp_path, monkeypatch):
    target = tmp_path / "qat-state"
    target.mkdir()
    (target / "a").write_text("1")
    (target / "b").write_text("2")
    import mgtq.files

    def killed(path, ignore_errors=False):
        os.unlink(os.path.join(path, "a"))  # part of it deleted, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(mgtq.files.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_directory(target)
    monkeypatch.undo()
    assert not target.exists()  # never half of it under its name
    recover_atomic_target(target)  # what a resumed run does first: the debris goes, nothing comes back
    assert list(tmp_path.iterdir()) == []
    remove_directory(target)  # nothing to remove: nothing happens


def test_stale_temporary_and_old_folders_are_cleaned(tmp_path):
    target = tmp_path / "out"
    dead = _dead_pid()
    for name in (f".out.tmp-{dead}-aaaa0000", f".out.old-{dead}-bbbb1111", f".out.tmp-{os.getpid()}-cccc2222"):
        (tmp_path / name).mkdir()
    (tmp_path / ".other.tmp-1-dddd3333").mkdir()  # another target's debris: not ours to judge
    # names mgtq never gives its temporary files are the user's, whatever they look like
    for name in (".out.tmp-x1y2z3", ".out.swp", f".out.tmp-{dead}-backup"):
        (tmp_path / name).mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".other.tmp-1-dddd3333", ".out.swp", f".out.tmp-{dead}-backup",
                           f".out.tmp-{os.getpid()}-cccc2222", ".out.tmp-x1y2z3", "out"])


def test_a_target_lost_between_the_two_renames_is_restored(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}-cccc0000"  # the state a kill between the renames leaves
    old.mkdir()
    (old / "a.txt").write_text("good")
    recover_directory(target)
    assert (target / "a.txt").read_text() == "good" and not old.exists()


def test_files_and_folders_get_normal_permissions(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "private.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "private.bin", 0o600)
    atomic_write_text(tmp_path / "note.json", "{}")
    mask = _umask()
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (target / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (target / "sub" / "private.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "note.json").stat().st_mode & 0o777 == 0o666 & ~mask


# ------------------------------------------------------------------- special files and symlinks
def _char_device_or_skip(path):
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs root")


@pytest.mark.parametrize("kind", ["fifo", "char device", "link to stdout", "folder"])
def test_a_special_file_is_refused_and_left_as_it_was(tmp_path, kind):
    target = tmp_path / "result.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "char device":
        _char_device_or_skip(target)
    elif kind == "link to stdout":
        read, write = os.pipe()  # what /dev/stdout → /proc/self/fd/1 is under a pipe
        os.symlink(f"/proc/self/fd/{write}", target)
    else:
        target.mkdir()
    before = os.lstat(target)
    with pytest.raises(ValueError, match="writes regular files only"):
        write_json(target, {"a": 1})
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_the_cli_refuses_a_fifo_as_json_output_before_any_work(tmp_path, capsys):
    from mgtq.cli import main

    fifo = tmp_path / "x.json"
    os.mkfifo(fifo)
    assert main(["eval", "--json", str(fifo), "--limit", "1"]) == 2
    assert "is a FIFO (named pipe); mgtq writes regular files only" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlinked_file_is_written_through_and_stays_a_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_json(link, {"a": 1})
    assert link.is_symlink() and read_json(real) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_a_symlinked_folder_is_replaced_through_and_stays_a_link(tmp_path):
    real = tmp_path / "real"
    with atomic_directory(real) as tmp:
        (tmp / "a.txt").write_text("one")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_directory(link) as tmp:
        (tmp / "a.txt").write_text("two")
    assert link.is_symlink() and (real / "a.txt").read_text() == "two"


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "img.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_atomic_entries_replaces_only_what_it_writes_and_a_failed_write_changes_nothing(tmp_path):
    from mgtq.files import atomic_entries

    target = tmp_path / "repo"
    (target / "part").mkdir(parents=True)
    (target / "part" / "old.bin").write_text("old")
    (target / "mine.txt").write_text("user's")
    (target / "weights-1.bin").write_text("stale")
    with pytest.raises(RuntimeError), atomic_entries(target) as tmp:
        (tmp / "part").mkdir()
        (tmp / "index.json").write_text("{}")
        raise RuntimeError("killed midway")
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt", "part", "weights-1.bin"]
    assert (target / "part" / "old.bin").read_text() == "old" and not list(tmp_path.glob(".repo.*"))
    with atomic_entries(target, stale=lambda name: name.startswith("weights")) as tmp:
        (tmp / "part").mkdir()
        (tmp / "part" / "new.bin").write_text("new")
        (tmp / "index.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["index.json", "mine.txt", "part"]
    assert [p.name for p in (target / "part").iterdir()] == ["new.bin"]
    (target / "index.json").unlink()
    (target / "index.json").mkdir()  # a folder where the save writes a file: refused, nothing replaced
    with pytest.raises(ValueError, match="is a folder, where the save writes a file"), atomic_entries(target) as tmp:
        (tmp / "part").mkdir()
        (tmp / "index.json").write_text("{}")
    assert [p.name for p in (target / "part").iterdir()] == ["new.bin"]
    with atomic_entries(tmp_path / "new") as tmp:  # a new folder: written whole
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "new" / "a.txt").read_text() == "a"


def _exchange_supported(tmp_path) -> bool:
    from mgtq.files import _exchange

    a, b = tmp_path / "probe" / "a", tmp_path / "probe" / "b"
    a.mkdir(parents=True), b.mkdir()
    supported = _exchange(a, b)
    shutil.rmtree(tmp_path / "probe")
    return supported


def test_a_replaced_folder_is_never_missing(tmp_path, monkeypatch):
    """Where the OS exchanges folders in one step, the target is never renamed away (no moment without it)."""
    if not _exchange_supported(tmp_path):
        pytest.skip("this OS or file system has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moves.append(Path(src)), real_replace(src, dst)))
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("two")
    assert target not in moves
    assert (target / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_exchange_a_folder_is_replaced_by_two_renames(tmp_path, monkeypatch):
    import mgtq.files

    monkeypatch.setattr(mgtq.files, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    for text in ("one", "two"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text(text)
    assert (target / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (relative, POSIX) → its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _saved_pipeline(target: Path) -> None:
    for part in ("scheduler", "text_encoder", "transformer"):
        (target / part).mkdir(parents=True)
        (target / part / "config.json").write_text(f"old {part}")
    (target / "model_index.json").write_text("old checksums")
    (target / "README.md").write_text("the user's")


def _save_again(target: Path) -> None:
    from mgtq.files import atomic_entries

    with atomic_entries(target) as tmp:
        for part in ("scheduler", "text_encoder", "transformer"):
            (tmp / part).mkdir()
            (tmp / part / "config.json").write_text(f"new {part}")
        (tmp / "model_index.json").write_text("new checksums")


def _pipeline_without_exchange(tmp_path, monkeypatch):
    """A saved pipeline folder and the tree around it, on a system without an atomic exchange (as Windows)."""
    import mgtq.files

    target = tmp_path / "pipe"
    _saved_pipeline(target)
    monkeypatch.setattr(mgtq.files, "_renameat2", lambda: None)
    return target, _tree(tmp_path)


def test_without_exchange_a_refused_rename_of_the_second_entry_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """As on Windows: no atomic exchange, and a folder holding a file in use (a loaded pipeline maps its weights)
    cannot be renamed. A save into that folder must not stop half-way with some parts new and model_index.json
    old."""
    target, before = _pipeline_without_exchange(tmp_path, monkeypatch)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == target / "text_encoder":  # the second entry (folders first, by name)
            raise PermissionError(13, "Access is denied", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError, match=r"text_encoder is in use \(loaded by a running program\?\): close it "
                                              r"and retry; nothing in .*pipe was replaced"):
        _save_again(target)
    assert _tree(tmp_path) == before  # no new part, no old one moved away, no debris
    monkeypatch.setattr(os, "replace", real_replace)  # the program closed: the same save goes through
    _save_again(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    assert {name: text for name, text in _tree(target).items() if text is not None} == {
        "README.md": b"the user's", "model_index.json": b"new checksums", "scheduler/config.json": b"new scheduler",
        "text_encoder/config.json": b"new text_encoder", "transformer/config.json": b"new transformer"}


def test_without_exchange_a_failure_putting_the_new_entries_in_puts_the_old_ones_back(tmp_path, monkeypatch):
    target, before = _pipeline_without_exchange(tmp_path, monkeypatch)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == target / "transformer" and Path(src).parent != target:  # the new one, not the old back
            raise PermissionError(13, "Access is denied", str(src))  # Windows: an antivirus scanning the new file
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError, match="Access is denied"):
        _save_again(target)
    assert _tree(tmp_path) == before


def test_a_writer_whose_liveness_cannot_be_told_is_taken_for_alive(monkeypatch):
    import errno

    import mgtq.files

    def kill(pid, signal):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "kill", kill)
    assert mgtq.files.writer_alive(_dead_pid())
    monkeypatch.setattr(os, "kill", lambda pid, signal: (_ for _ in ()).throw(ProcessLookupError()))
    assert not mgtq.files.writer_alive(12345)


def test_on_windows_a_writer_is_looked_up_and_never_signalled(tmp_path, monkeypatch):
    """os.kill(pid, 0) on Windows sends Ctrl+C to the pid's console group (signal 0 is CTRL_C_EVENT there)."""
    import types

    import mgtq.files

    def kill(pid, signal):
        raise AssertionError("os.kill called on Windows")

    alive = {4242}
    monkeypatch.setattr(mgtq.files, "_WINDOWS", True)
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(pid_exists=lambda pid: pid in alive))
    for pid in (4242, 4343):
        (tmp_path / f".out.png.tmp-{pid}-0123abcd.png").write_bytes(b"half")
    atomic_write_text(tmp_path / "out.png", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.png.tmp-4242-0123abcd.png", "out.png"]


def test_the_climb_to_an_existing_folder_stops_at_a_missing_drive_or_share():
    """On Windows the parent of `Z:\\` is `Z:\\` itself, and of `\\\\nas\\share\\` that share root: a missing drive
    or unreachable share must end the climb with a one-line error, not loop forever."""
    from pathlib import PureWindowsPath

    from mgtq.files import existing_parent

    class MissingWindowsPath(PureWindowsPath):
        def exists(self):
            return False

    for path, root in ((r"Z:\renders\out.png", "Z:\\"), (r"\\nas\share\renders\out.png", "\\\\nas\\share\\")):
        with pytest.raises(ValueError) as caught:
            existing_parent(MissingWindowsPath(path))
        assert str(caught.value) == (f"{root} does not exist (a drive that is not there, or a network share that "
                                     "cannot be reached?); choose a path on a drive that exists")


def test_the_nearest_existing_folder_is_found(tmp_path):
    from mgtq.files import existing_parent

    assert existing_parent(tmp_path / "a" / "b" / "c.png") == tmp_path
    assert existing_parent(tmp_path / "c.png") == tmp_path
