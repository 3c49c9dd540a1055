"""A checkout that rewrites line endings (Git for Windows' default, core.autocrlf=true) leaves the embedded models'
and fixtures' files byte for byte as committed: their recorded sha256 sums still hold."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _git(*args, cwd=ROOT) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True).stdout


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_an_autocrlf_checkout_keeps_the_embedded_models_byte_for_byte(tmp_path):
    clone = tmp_path / "clone"
    _git("clone", "-q", "-c", "core.autocrlf=true", str(ROOT), str(clone))  # the committed HEAD, as a user clones
    paths = [p for p in _git("ls-files", "checkpoints", "tests/fixtures", cwd=clone).decode().splitlines()
             if p.endswith((".json", ".tsv", ".txt"))]
    assert any(p.endswith("model_index.json") for p in paths)
    changed = [p for p in paths if (clone / p).read_bytes() != _git("cat-file", "blob", f"HEAD:{p}", cwd=clone)]
    assert changed == []  # without .gitattributes: every JSON file of the embedded models gained CR bytes
