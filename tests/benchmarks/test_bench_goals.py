"""benchmarks/bench_goals.py: the goal table of a committed bench JSON, peers read from benchmarks/bench_peers.py;
the compiled weight-cache goals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_goals_compare_mgtq_w4a8_with_each_w4a8_peer_of_the_lab():
    from mgtq.bench.lab import load_lab

    peers = load_lab("peers").W4A8_PEERS  # the one definition the goals script imports too
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "bench_goals.py",
                           ROOT / "benchmarks" / "results" / "bench_tiny-shapes.json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((ROOT / "benchmarks" / "results" / "bench_tiny-shapes.json").read_text())
    ran = {r["label"] for r in report["results"] if r["status"] == "ok"}
    assert "quanto-w4a8" in peers and "torchao-w4a8" not in peers  # no integer GEMM on x86: no competitor
    for peer in peers:  # one forward and one weights goal each of those the run has
        assert (f"| mgtq w4a8 forward / {peer} forward |" in done.stdout) == (peer in ran)
        assert (f"| mgtq w4a8 weight bytes / {peer} weight bytes |" in done.stdout) == (peer in ran)


def test_compiled_cached_goals_read_the_round_medians(benchmark_script):
    bench_goals = benchmark_script("bench_goals")
    spread = {"min": 0.7, "max": 0.9, "rounds": 5}
    report = {"results": [], "ratios": {
        "w4a8-cached+compile": {"forward_vs_bf16": 0.82, "forward_vs_bf16_spread": spread},
        "scq-cached+compile": {"forward_vs_bf16": 0.74},
    }}
    rows = {g["name"]: g for g in bench_goals.goals(report)}
    assert set(rows) == {"compile_w4a8-cached_forward", "compile_scq-cached_forward"}
    w4a8, scq = rows["compile_w4a8-cached_forward"], rows["compile_scq-cached_forward"]
    assert (w4a8["value"], w4a8["target"], w4a8["met"], w4a8["spread"]) == (0.82, 0.60, False, spread)
    assert scq["met"] and scq["target"] == 0.75
    assert "compiled w4a8-cached forward / compiled bf16" in bench_goals.to_markdown(list(rows.values()))


def test_runs_read_side_by_side_pool_their_rounds_and_count_the_runs_that_meet_a_goal(benchmark_script, tmp_path):
    bench_goals = benchmark_script("bench_goals")

    def run(value, low, high):
        return {"results": [], "model": {"name": "meissonic-1024"}, "settings": {"json": "x", "threads": 1},
                "machine": {"cpu_class": "avx512-vnni", "torch_threads": 1}, "ratios": {
                    "w4a8+compile": {"forward_vs_bf16": value, "forward_vs_bf16_spread": {"min": low, "max": high,
                                                                                          "rounds": 5}},
                    "scq": {"weights_vs_bf16": 0.272}}}

    runs = [run(0.594, 0.582, 0.597), run(0.625, 0.622, 0.632)]
    rows = {g["name"]: g for g in bench_goals.across_runs([bench_goals.goals(r) for r in runs])}
    w4a8 = rows["compile_w4a8_forward"]
    assert (w4a8["values"], w4a8["met_runs"], w4a8["low"], w4a8["high"], w4a8["rounds"]) == (
        [0.594, 0.625], 1, 0.582, 0.632, 10)
    assert rows["scq_weights"]["rounds"] == 0 and rows["scq_weights"]["met_runs"] == 2
    paths = []
    for i, r in enumerate(runs):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "bench_goals.py", *paths],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("| compiled W4A8 forward / compiled bf16 | 0.594, 0.625 | 0.582–0.632 (10 rounds) | <= 0.6 | 1 of 2 runs |"
            in done.stdout)
    assert "| SCQ transformer weights / bf16 | 0.272, 0.272 | – | <= 0.28 | 2 of 2 runs |" in done.stdout


def test_runs_of_other_commands_are_refused_and_a_goal_one_run_lacks_counts_all_runs(benchmark_script, tmp_path):
    bench_goals = benchmark_script("bench_goals")
    base = {"results": [], "model": {"name": "meissonic-1024"}, "settings": {"json": "a", "threads": 1},
            "machine": {"cpu_class": "avx512-vnni", "torch_threads": 1}}
    first = {**base, "ratios": {"scq": {"weights_vs_bf16": 0.272}}}
    second = {**base, "settings": {"json": "b", "threads": 1},
              "ratios": {"scq": {"weights_vs_bf16": 0.272}, "w4a8": {"forward_vs_bf16": 0.62}}}
    bench_goals.check_same_command([first, second])  # only where the JSON went differs
    rows = {g["name"]: g for g in bench_goals.across_runs([bench_goals.goals(first), bench_goals.goals(second)])}
    assert rows["w4a8_forward"]["values"] == [None, 0.62] and rows["w4a8_forward"]["met_runs"] == 1
    assert "| 0.272, 0.272 |" in bench_goals.runs_to_markdown(list(rows.values()))
    assert "| –, 0.620 |" in bench_goals.runs_to_markdown(list(rows.values()))
    other = {**second, "machine": {"cpu_class": "amx-int8", "torch_threads": 1}}
    with pytest.raises(ValueError, match="differs from run 1 in cpu_class"):
        bench_goals.check_same_command([first, other])
    paths = [tmp_path / "1.json", tmp_path / "2.json"]
    for path, report in zip(paths, (first, other)):
        path.write_text(json.dumps(report))
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "bench_goals.py", *paths],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "differs from run 1 in cpu_class" in done.stderr


def test_a_failed_case_or_peer_is_said_and_a_memory_only_run_has_no_forward_goals(benchmark_script):
    bench_goals = benchmark_script("bench_goals")

    def result(label, status="ok", forward=None, weights=100):
        return {"label": label, "status": status, "message": "out of memory" if status != "ok" else "",
                "tome": 0.0, "offload": False, "target": label, "weights": {"transformer_bytes": weights},
                "latency": {"forward": forward}}

    memory_only = {"ratios": {}, "results": [result("bf16"), result("w4a8", weights=50),
                                             result("torchao-w4a8-da8w4", weights=80)]}
    rows = {g["name"]: g for g in bench_goals.goals(memory_only)}  # it crashed on the missing forwards
    assert "w4a8_vs_torchao-w4a8-da8w4_forward" not in rows
    assert rows["w4a8_vs_torchao-w4a8-da8w4_weights"]["value"] == pytest.approx(50 / 80)
    failed = {"ratios": {}, "results": [result("bf16"), result("scq", "failed"), result("w4a8"),
                                        result("quanto-w4a8", "skipped")]}
    rows = {g["name"]: g for g in bench_goals.goals(failed)}
    assert rows["scq_forward"]["not_evaluated"] == "scq failed: out of memory"
    assert rows["w4a8_vs_quanto-w4a8_forward"]["not_evaluated"].startswith("quanto-w4a8 skipped")
    assert "not evaluated (scq failed: out of memory)" in bench_goals.to_markdown(list(rows.values()))
    # a peer's forward goal reads the median of per-round ratios, as the others do
    a = {"median": 2.0, "samples": [1.0, 3.0, 2.0], "rounds": [0, 1, 2]}
    b = {"median": 2.0, "samples": [2.0, 2.0, 4.0], "rounds": [0, 1, 2]}
    interleaved = {"ratios": {}, "results": [result("w4a8", forward=a), result("torchao-w4a8-da8w4", forward=b)]}
    rows = {g["name"]: g for g in bench_goals.goals(interleaved)}
    assert rows["w4a8_vs_torchao-w4a8-da8w4_forward"]["value"] == pytest.approx(0.5)  # per round 0.5, 1.5, 0.5
