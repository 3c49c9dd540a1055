"""mgtq.hashing: files hashed ahead, side by side, and never taken for a file changed since."""

import os


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


def _run_like_tree(root):
    """Names whose order differs between component-wise, whole-string and case-blind comparison."""
    files = {"a/x": b"ax", "a-b/x": b"abx", "a.b": b"dot", "B": b"upper", "a/B/y": b"aBy", "a/b/y": b"aby",
             "Z/z": b"zz", "a/x-y": b"axy", ".hidden": b"left out", "a/.swp": b"left out"}
    for name, data in files.items():
        path = root / "tree" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "prompts.txt").write_bytes(b"a red circle\n")
    return {"tree": root / "tree", "prompts": root / "prompts.txt", "missing": root / "none"}


def test_a_folders_fingerprint_is_the_one_earlier_versions_computed_on_linux(tmp_path):
    from mgtq.hashing import files_fingerprint

    parts = _run_like_tree(tmp_path)
    # computed by mgtq before fingerprints were made the same on every system: runs calibrated since stay current
    assert files_fingerprint(parts) == "593ceac5bb7f1917"
    assert files_fingerprint({"tree": parts["tree"]}) == "e5f68b735500cbed"


def test_a_folders_fingerprint_is_the_same_where_paths_print_and_sort_as_on_windows(tmp_path, monkeypatch):
    """A run calibrated on Linux and exported on Windows: there a path prints with backslashes and paths sort
    without case ("a" before "B"); neither may change what the run's stages were fingerprinted with."""
    from pathlib import PurePath

    from mgtq.hashing import files_fingerprint

    parts = _run_like_tree(tmp_path)
    here = files_fingerprint(parts)

    def without_case(self, other):
        return [part.casefold() for part in self.parts] < [part.casefold() for part in other.parts]

    def with_backslashes(self, spec):
        return format(str(self).replace("/", "\\"), spec)

    with monkeypatch.context() as m:
        m.setattr(PurePath, "__lt__", without_case)
        m.setattr(PurePath, "__format__", with_backslashes)
        assert sorted([PurePath("B"), PurePath("a")]) == [PurePath("a"), PurePath("B")]  # the simulation holds
        assert f"{PurePath('a/x')}" == "a\\x"
        windows = files_fingerprint(parts)
    assert windows == here
