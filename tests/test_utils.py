"""Atomic writes: nothing half-written, debris of killed writers recovered, normal permissions."""

import os
import subprocess
import sys

import pytest

from mgtq.utils import atomic_directory, atomic_write_text, recover_directory


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


def test_stale_temporary_and_old_folders_are_cleaned(tmp_path):
    target = tmp_path / "out"
    dead = _dead_pid()
    for name in (f".out.tmp-{dead}-aaaa", f".out.old-{dead}-bbbb", ".out.tmp-x1y2z3", f".out.tmp-{os.getpid()}-live"):
        (tmp_path / name).mkdir()
    (tmp_path / ".other.tmp-1-x").mkdir()  # another target's debris: not ours to judge
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".other.tmp-1-x", f".out.tmp-{os.getpid()}-live", "out"]


def test_a_target_lost_between_the_two_renames_is_restored(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}-cccc"  # the state a kill between the renames leaves
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
