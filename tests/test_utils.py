"""Atomic writes: nothing half-written, debris of killed writers recovered, normal permissions; the finite check."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgtq.files import atomic_directory, atomic_file, atomic_write_text, read_json, recover_directory, write_json
from mgtq.finite import all_finite


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 4097, -1])
def test_all_finite_finds_one_nan_or_infinity_anywhere(dtype, bad, where):
    t = torch.randn(3, 4099, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t) and all_finite(t.t())  # a strided view too
    t.view(-1)[where] = bad
    assert not all_finite(t) and not all_finite(t.t())
    assert not all_finite(t.view(-1)[where:][:1])


def test_all_finite_agrees_with_isfinite_and_takes_empty_and_extreme_tensors():
    big = torch.full((5,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert all_finite(big) and all_finite(-big)  # finite extremes are finite (no sum that could overflow)
    assert all_finite(torch.empty(0, 3))
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        t = torch.randn(64, generator=gen)
        t[torch.rand(64, generator=gen) < 0.05] = float("nan")
        assert all_finite(t) == bool(torch.isfinite(t).all())


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


def test_generators_of_another_device_seed_generators_on_the_sampling_device(monkeypatch):
    """A CUDA generator draws its seeds on its own device (a CPU draw from it is an error), and generators on
    another device than the sampler's seed one each there, so no step samples on the host."""
    import mgtq.seeding
    from mgtq.seeding import per_sample_generators

    made, draws = [], []
    monkeypatch.setattr(mgtq.seeding, "_generator_on", lambda device, seed: made.append((str(device), seed)) or seed)
    real_randint = torch.randint

    def randint(*args, generator=None, device=None, **kw):
        draws.append(device)
        return real_randint(*args, generator=generator, device=device, **kw)

    monkeypatch.setattr(torch, "randint", randint)
    cpu = [torch.Generator().manual_seed(i) for i in (7, 8)]
    assert per_sample_generators(2, generator=cpu, device="cpu") == cpu and not made  # same device: as given
    seeds = per_sample_generators(2, generator=[torch.Generator().manual_seed(i) for i in (7, 8)], device="cuda")
    assert [d for d, _ in made] == ["cuda", "cuda"] and seeds == [s for _, s in made]
    assert seeds == per_sample_generators(2, generator=[torch.Generator().manual_seed(i) for i in (7, 8)],
                                          device="cuda:0")  # the same seeds: reproducible
    assert len(set(seeds)) == 2
    draws.clear()
    per_sample_generators(3, generator=torch.Generator().manual_seed(1), device="cuda")
    assert draws == [torch.device("cpu")] * 3  # on the generator's device, whatever the sampler's; one per seed
    # seed i is the same whatever the count (one draw each: a long draw need not begin with a short one's values)
    made.clear()
    per_sample_generators(2, generator=torch.Generator().manual_seed(1), device="cuda")
    two = [s for _, s in made]
    made.clear()
    per_sample_generators(5, generator=torch.Generator().manual_seed(1), device="cuda")
    assert [s for _, s in made][:2] == two


def test_files_hashed_ahead_are_read_once_and_a_file_changed_since_is_hashed_again(tmp_path, monkeypatch):
    import hashlib
    import time

    import mgtq.hashing
    from mgtq.hashing import hashed_ahead, sha256_file

    files = [tmp_path / f"{name}.bin" for name in "abc"]
    for i, path in enumerate(files):
        path.write_bytes(bytes([i]) * (1 << 20))
    reads = []
    real_feed = mgtq.hashing._feed_file
    monkeypatch.setattr(mgtq.hashing, "_feed_file",
                        lambda h, p, stop=None: reads.append(p.name) or real_feed(h, p, stop))
    with hashed_ahead(files + [tmp_path / "missing.bin"]):  # a missing file is left to the checks
        assert [sha256_file(p) for p in files] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
        assert sorted(reads) == ["a.bin", "b.bin", "c.bin"]  # answered from the hashes made ahead
        time.sleep(0.01)
        files[0].write_bytes(b"changed")  # after it was hashed ahead: hashed again, as it is now
        assert sha256_file(files[0]) == hashlib.sha256(b"changed").hexdigest() and len(reads) == 4
    assert sha256_file(files[1]) == hashlib.sha256(files[1].read_bytes()).hexdigest() and len(reads) == 5


def test_a_file_rewritten_with_its_old_size_and_time_is_not_taken_for_its_hash_ahead(tmp_path):
    import hashlib

    from mgtq.hashing import hashed_ahead, sha256_file

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 4096)
    with hashed_ahead([path]):
        before = path.stat()
        with open(path, "r+b") as f:  # rewritten in place, same size, modification time put back
            f.write(b"b" * 100)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert sha256_file(path) == hashlib.sha256(b"b" * 100 + b"a" * 3996).hexdigest()


def test_all_finite_takes_one_byte_floats():
    t = torch.zeros(8).to(torch.float8_e5m2)
    assert all_finite(t)
    t[3] = float("inf")
    assert not all_finite(t)


def test_hashes_ahead_run_beside_the_block_and_stop_when_it_ends(tmp_path, monkeypatch):
    import hashlib
    import threading

    import mgtq.hashing
    from mgtq.hashing import hashed_ahead, sha256_file

    slow, quick = tmp_path / "slow.bin", tmp_path / "quick.bin"
    slow.write_bytes(b"s" * (3 << 24))  # three chunks
    quick.write_bytes(b"q" * 100)
    started, release, chunks = threading.Event(), threading.Event(), []
    real_update = hashlib.sha256

    class Gated:  # the slow file's hash waits after its first chunk until the test lets it go on
        def __init__(self):
            self.h = real_update()

        def update(self, chunk):
            if chunk[:1] == b"s":
                chunks.append(len(chunk))
                started.set()
                release.wait(5)
            self.h.update(chunk)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(mgtq.hashing.hashlib, "sha256", Gated)
    with hashed_ahead([slow, quick]):
        assert started.wait(5)  # the block runs while the slow hash is under way
        assert sha256_file(quick) == real_update(b"q" * 100).hexdigest()  # another file's check does not wait
        threading.Timer(0.2, release.set).start()  # lets the first chunk through once the block is left
    assert chunks == [1 << 24]  # leaving the block stopped the hash nobody asked for: no second chunk read
