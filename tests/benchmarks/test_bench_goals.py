"""benchmarks/bench_goals.py: the goal table of a committed bench JSON, peers read from benchmarks/bench_peers.py."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_goals_compare_mgtq_w4a8_with_each_w4a8_peer_of_the_lab():
    from mgtq.bench.lab import load_lab

    peers = load_lab("peers").W4A8_PEERS  # the one definition the goals script imports too
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "bench_goals.py",
                           ROOT / "benchmarks" / "results" / "bench_tiny-shapes.json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for peer in peers:  # that run has every W4A8 peer ok: one forward and one weights goal each
        assert f"| mgtq w4a8 forward / {peer} forward |" in done.stdout
        assert f"| mgtq w4a8 weight bytes / {peer} weight bytes |" in done.stdout
