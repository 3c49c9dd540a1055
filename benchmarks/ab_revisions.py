"""Block latency of two revisions of mgtq side by side: how much a change made each format faster.

A change to the forward cannot be timed against itself in one process, so each revision is checked
out in a temporary git worktree and round after round each revision runs a fresh
`benchmarks/bench_blocks.py --rounds 1` process in turn, the order alternating (A B, B A, …), its own code on its own
PYTHONPATH; the machine's drift lands on both sides of every per-round ratio. Reported per format
and compile setting: the median ms per call of each revision [min–max] and the median of the
per-round ratios new / base [min–max].

Needs a git checkout (it runs `git worktree add`; the worktrees are removed at the end).

Usage::

    python benchmarks/ab_revisions.py --base f697a2f~1 --head HEAD --formats bf16,w4a8-cached,scq-cached \\
        --rounds 5 --threads 1 --out benchmarks/results/ab_float_path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mgtq.files import atomic_write_text, write_json

REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def one_round(tree: Path, args, out: Path) -> dict[str, float]:
    """{variant name: ms per call} of one bench_blocks process run from worktree `tree`."""
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_blocks.py"), "--threads", str(args.threads),
           "--rounds", "1", "--warmup", str(args.warmup), "--formats", args.formats, "--out", str(out)]
    if args.compile:
        cmd.append("--compile")
    if args.tiny:
        cmd.append("--tiny")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(cmd, check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    record = json.loads(out.with_suffix(".json").read_text())
    return {v["name"]: 1000 * v["seconds"][0] for v in record["variants"]}


def summary(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision before the change")
    parser.add_argument("--head", default="HEAD", help="the revision with the change")
    parser.add_argument("--formats", default="bf16", help="bench_blocks.py --formats (must include bf16)")
    parser.add_argument("--compile", action="store_true", help="also the compiled variants")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="bench_blocks.py's small shapes (a smoke test)")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    revs = {"base": git("rev-parse", "--short", args.base), "head": git("rev-parse", "--short", args.head)}
    samples: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
    with tempfile.TemporaryDirectory(prefix="mgtq-ab-") as tmp:
        trees, added = {side: Path(tmp) / side for side in revs}, []
        try:
            for side, rev in revs.items():
                git("worktree", "add", "--detach", str(trees[side]), rev)
                added.append(trees[side])
            for r in range(args.rounds):
                order = ("base", "head") if r % 2 == 0 else ("head", "base")  # A B B A: neither always first
                for side in order:
                    for name, ms in one_round(trees[side], args, Path(tmp) / f"{side}-{r}").items():
                        samples[side].setdefault(name, []).append(ms)
                print(f"round {r + 1}/{args.rounds}", flush=True)
        finally:
            for tree in added:
                git("worktree", "remove", "--force", str(tree))
    names = [n for n in samples["base"] if n in samples["head"]]
    rows = [{"variant": n, "base_ms": samples["base"][n], "head_ms": samples["head"][n],
             "ratio": [h / b for b, h in zip(samples["base"][n], samples["head"][n])]} for n in names]
    cmd = " ".join(["python benchmarks/ab_revisions.py", "--base", args.base, "--head", args.head, "--formats",
                    args.formats, *(["--compile"] if args.compile else []), "--rounds", str(args.rounds),
                    "--threads", str(args.threads), *(["--out", str(args.out)] if args.out else [])])
    lines = [f"# One MMDiT + one single-stream block (Meissonic-1024 sizes): {revs['base']} against {revs['head']}", "",
             f"{args.threads} thread(s), {args.rounds} rounds, each a fresh `bench_blocks.py --rounds 1` process per "
             f"revision, the order alternating; load average at the end {[round(v, 2) for v in os.getloadavg()]}.", "",
             f"| variant | {revs['base']} ms per call | {revs['head']} ms per call | {revs['head']} / {revs['base']} |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {summary(r['base_ms'], 1)} | {summary(r['head_ms'], 1)} | {summary(r['ratio'])} |"
              for r in rows]
    text = "\n".join(lines) + f"\n\nCommand: `{cmd}`\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".md"), text)
        write_json(args.out.with_suffix(".json"), dict(revisions=revs, rounds=args.rounds, threads=args.threads,
                                                       rows=rows))
    print(text)
    return text


if __name__ == "__main__":
    main()
