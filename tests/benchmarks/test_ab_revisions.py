"""benchmarks/ab_revisions.py: two revisions' blocks timed in alternating fresh processes, worktrees removed."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


@pytest.mark.skipif(_git("rev-parse", "HEAD").returncode != 0, reason="needs a git checkout")
def test_ab_revisions_tiny_same_revision(tmp_path, benchmark_script):
    out = tmp_path / "ab"
    benchmark_script("ab_revisions").main(["--base", "HEAD", "--head", "HEAD", "--formats", "bf16", "--rounds", "2", "--warmup", "0",
                    "--tiny", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["revisions"]["base"] == record["revisions"]["head"]
    (row,) = record["rows"]
    assert row["variant"] == "bf16" and len(row["base_ms"]) == len(row["head_ms"]) == len(row["ratio"]) == 2
    assert all(r > 0 for r in row["ratio"])
    # its temporary worktrees are gone (other worktrees of the repository may come and go meanwhile)
    assert "mgtq-ab-" not in _git("worktree", "list", "--porcelain").stdout
