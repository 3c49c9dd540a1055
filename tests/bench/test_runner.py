"""mgtq.bench.runner: `mgtq bench` end to end (CLI smoke run, JSON schema), folders with a separate CLIP,
missing peers, a failing case process, interleaved rounds.

Peers, profiler categories and the plot are the lab in benchmarks/ (loaded through mgtq.bench.lab)."""

from __future__ import annotations

import json

import pytest
import torch

from mgtq.bench import BenchConfig, MeasureSettings, run_bench, validate_report
from mgtq.bench.lab import load_lab


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    from mgtq.cli import main

    out = tmp_path_factory.mktemp("bench") / "bench_smoke.json"
    code = main(["bench", "--model", "tiny-shapes", "--formats", "bf16,scq", "--repeats", "1", "--warmup", "0",
                 "--steps", "1", "--threads", "1", "--json", str(out), "--no-progress", "--plot"])
    assert code == 0
    return out


def test_cli_smoke_writes_json_markdown_and_with_plot_png(smoke_report):
    report = json.loads(smoke_report.read_text())
    assert [r["label"] for r in report["results"]] == ["bf16", "scq"]
    assert all(r["status"] == "ok" for r in report["results"])
    assert smoke_report.with_suffix(".md").read_text().startswith("# mgtq bench")
    assert smoke_report.with_suffix(".png").stat().st_size > 1000


def test_json_schema(smoke_report):
    report = json.loads(smoke_report.read_text())
    validate_report(report)
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_version"] == torch.__version__
    assert report["baseline"]["unit"] == "bytes" and report["baseline"]["rss"] > 0
    scq = next(r for r in report["results"] if r["label"] == "scq")
    assert scq["weights"]["linear_layers"].keys() == {"W4A8Linear", "W4Linear"}
    assert scq["memory"]["peak_rss_process"] >= scq["memory"]["rss_after_build"] > 0
    assert set(scq["memory"]["phase_peaks"]) == {"forwards", "sampling", "decode"}
    forward = scq["latency"]["forward"]
    assert forward["min"] <= forward["median"] <= forward["max"] and len(forward["samples"]) == 1
    assert forward["cpu_median"] > 0 and len(forward["cpu_samples"]) == 1
    assert scq["latency"]["image"]["steps"] == 1 and scq["latency"]["image"]["extrapolated_steps"] == 48
    assert scq["latency"]["image"]["local_nfe"] == 0 and scq["latency"]["image"]["reuse"]["interval"] == 1
    assert report["ratios"]["bf16"]["weights_vs_bf16"] == 1.0
    assert "goals" not in report  # the project's goals live in benchmarks/bench_goals.py
    broken = {**report, "results": [{k: v for k, v in scq.items() if k != "weights"}] * 2}
    with pytest.raises(ValueError, match="weights"):
        validate_report(broken)


def test_the_whole_image_runs_the_sampler_and_reuse_flags_and_the_report_says_so(tmp_path):
    from mgtq.cli import main

    out = tmp_path / "bench_fast.json"
    code = main(["bench", "--model", "tiny-shapes", "--formats", "bf16", "--repeats", "1", "--warmup", "0",
                 "--steps", "8", "--threads", "1", "--isolation", "none", "--latency", "--json", str(out),
                 "--no-progress", "--sampler", "fast", "--reuse-interval", "2"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["measure"]["sampler"] == "fast"
    (result,) = report["results"]
    image = result["latency"]["image"]
    assert image["reuse"] == {**report["settings"]["measure"]["reuse"], "interval": 2, "group": "cells", "warmup": 5}
    # steps 0-4 (warm-up), 5 and 7 are full, 6 local; an 8-step run says nothing exact about 48 steps
    assert (image["nfe"], image["local_nfe"]) == (8, 1) and 7 < image["token_nfe"] < 8
    assert image["extrapolated_total_s"] is None
    assert len(result["latency"]["forward"]["samples"]) == 1  # forwards are still timed, as plain full forwards
    markdown = out.with_suffix(".md").read_text()
    assert "sampler preset `fast`" in markdown and "context reuse interval 2, group cells, warmup 5" in markdown
    assert "Forwards are full forwards" in markdown and "| 8 (1) |" in markdown


def test_folder_with_a_separate_text_encoder_and_a_quantized_checkpoint(tmp_path, random_pipeline_dir):
    """A folder loads through MGTPipeline.from_pretrained, so a separate CLIP folder works as for mgtq.load."""
    from mgtq.export import write_checkpoint
    from mgtq.quantization import checkpoint
    from testkit import random_quantized_pipeline

    qpipe = random_quantized_pipeline()
    folder = write_checkpoint(random_pipeline_dir, qpipe.transformer,
                              checkpoint.describe(qpipe.transformer), tmp_path / "q")
    clip = tmp_path / "clip"
    (folder / "text_encoder").rename(clip)
    config = BenchConfig(model=str(folder), text_encoder=str(clip), formats=("scq",), isolation="none",
                         measure=MeasureSettings(repeats=1, steps=1, warmup=0, memory=False))
    report = run_bench(config, write=False, log=lambda msg: None)
    (result,) = report["results"]
    assert result["status"] == "ok" and "as exported" in " ".join(result["notes"])
    assert report["model"]["kind"] == "quantized-dir" and report["model"]["text_encoder"] == str(clip)
    with pytest.raises(FileNotFoundError, match="text_encoder=PATH"):
        run_bench(BenchConfig(model=str(folder), formats=("scq",), isolation="none",
                              measure=MeasureSettings(repeats=1, steps=1, warmup=0, memory=False)),
                  write=False, log=lambda msg: None)


def test_missing_peer_package_is_skipped_with_a_clear_message(monkeypatch):
    peers_module = load_lab("peers")
    real = peers_module.import_module

    def fake_import(name):
        if name.startswith("optimum"):
            raise ImportError(f"No module named {name!r}")
        return real(name)

    monkeypatch.setattr(peers_module, "import_module", fake_import)
    reason = peers_module.unavailable_reason("quanto-w4a8")
    assert "not installed" in reason and "pip install" in reason
    report = run_bench(BenchConfig(model="tiny-shapes", formats=(), peers=("quanto-w4a8",), isolation="none",
                                   measure=MeasureSettings(repeats=1, steps=1, warmup=0)),
                       write=False, log=lambda msg: None)
    (result,) = report["results"]
    assert result["status"] == "skipped" and "optimum.quanto" in result["message"]
    assert report["skipped"] == [result["message"]]


def test_a_failing_case_process_is_reported_and_the_next_one_runs(tmp_path):
    from mgtq.bench.case import make_payload
    from mgtq.bench.runner import ChildError, Worker
    from mgtq.bench.source import resolve_model

    source = resolve_model("tiny-shapes")
    with pytest.raises(ChildError, match="case must be a mapping"):  # no case: the process fails while building
        Worker(make_payload("case", source, None, MeasureSettings(), threads=1), in_process=False, folder=tmp_path)
    baseline = Worker(make_payload("baseline", source, None, MeasureSettings(), threads=1), False, tmp_path).result
    assert baseline["rss"] > 0 and baseline["imports"] == ["torch", "mgtq"]


def test_a_case_process_killed_between_rounds_is_reported_failed_and_the_run_goes_on(monkeypatch):
    import os
    import signal

    from mgtq.bench import runner

    original = runner.Worker.time_forwards

    def killing(self, n, round_index, budget_s):
        if round_index == 1 and self is killing.victim:
            os.kill(self._process.pid, signal.SIGKILL)  # as the OOM killer would
            self._process.wait()
        return original(self, n, round_index, budget_s)

    original_init = runner.Worker.__init__

    def init(self, payload, in_process, folder):
        original_init(self, payload, in_process, folder)
        if (payload.get("case") or {}).get("target") == "w4a8":
            killing.victim = self

    killing.victim = None
    monkeypatch.setattr(runner.Worker, "time_forwards", killing)
    monkeypatch.setattr(runner.Worker, "__init__", init)
    config = BenchConfig(model="tiny-shapes", formats=("bf16", "w4a8"), threads=1,
                         measure=MeasureSettings(repeats=3, steps=1, warmup=0, memory=False))
    report = run_bench(config, write=False, log=lambda _: None)
    assert killing.victim is not None
    status = {r["label"]: r["status"] for r in report["results"]}
    assert status == {"bf16": "ok", "w4a8": "failed"}
    w4a8 = next(r for r in report["results"] if r["label"] == "w4a8")
    assert "exited with code -9 (killed: out of memory?)" in w4a8["message"]
    bf16 = next(r for r in report["results"] if r["label"] == "bf16")
    assert bf16["latency"]["forward"]["rounds"] == [0, 1, 2]  # its rounds went on


def test_interleaved_rounds_time_each_case_once_per_round_after_all_are_built():
    messages = []
    config = BenchConfig(model="tiny-shapes", formats=("bf16", "w4a8"), isolation="none", threads=1,
                         measure=MeasureSettings(repeats=3, steps=1, warmup=0, memory=False))
    report = run_bench(config, write=False, log=messages.append)
    for r in report["results"]:
        assert r["latency"]["forward"]["rounds"] == [0, 1, 2] and len(r["latency"]["forward"]["samples"]) == 3
    first_round = next(i for i, m in enumerate(messages) if m.startswith("round 1/3"))
    assert sum(m.endswith("building and warming up …") for m in messages[:first_round]) == 2
    assert report["ratios"]["w4a8"]["forward_vs_bf16_spread"]["rounds"] == 3
    assert len(report["machine"]["loadavg_rounds"]) == 3 and "interleaved" in report["machine"]["timing"]


def test_a_sequential_run_reads_the_ratio_of_its_medians_without_a_per_round_spread():
    # its samples were recorded as round 0 each, so the ratio paired the two configs' last samples only
    import statistics

    config = BenchConfig(model="tiny-shapes", formats=("bf16", "w4a8"), isolation="none", threads=1,
                         measure=MeasureSettings(repeats=3, steps=1, warmup=0, memory=False, interleave=False))
    report = run_bench(config, write=False, log=lambda _: None)
    forward = {r["label"]: r["latency"]["forward"] for r in report["results"]}
    assert all(f["rounds"] is None and len(f["samples"]) == 3 for f in forward.values())
    medians = {label: statistics.median(f["samples"]) for label, f in forward.items()}
    assert report["ratios"]["w4a8"]["forward_vs_bf16"] == pytest.approx(medians["w4a8"] / medians["bf16"])
    assert "forward_vs_bf16_spread" not in report["ratios"]["w4a8"]


def test_a_compiled_case_warms_up_even_with_warmup_0():
    # its first forward compiles: with --warmup 0 that landed in its first timed round
    config = BenchConfig(model="tiny-shapes", formats=("bf16",), compile=True, isolation="none", threads=1,
                         measure=MeasureSettings(repeats=1, steps=1, warmup=0, memory=False))
    report = run_bench(config, write=False, log=lambda _: None)
    warmups = {r["label"]: r["latency"]["warmup_s"] for r in report["results"]}
    assert len(warmups["bf16"]) == 0 and len(warmups["bf16+compile"]) == 1


def test_a_report_names_the_commit_of_the_checkout_it_ran_from(smoke_report):
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    commit = json.loads(smoke_report.read_text())["machine"]["mgtq_commit"]
    if not (root / ".git").exists():
        assert commit is None
        return
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert re.fullmatch(re.escape(head) + r"(\+dirty)?", commit)


def test_each_config_leads_a_round_in_turn():
    from mgtq.bench.runner import round_order

    assert [round_order(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert round_order(1, 5) == [0] and round_order(0, 2) == []


def test_interleaved_rounds_start_at_another_config_each_round(monkeypatch):
    from mgtq.bench import runner

    order = []
    original = runner.Worker.time_forwards

    def recording(self, n, round_index, budget_s):
        order.append((round_index, id(self)))
        return original(self, n, round_index, budget_s)

    monkeypatch.setattr(runner.Worker, "time_forwards", recording)
    config = BenchConfig(model="tiny-shapes", formats=("bf16", "w4a8"), isolation="none", threads=1,
                         measure=MeasureSettings(repeats=2, steps=1, warmup=0, memory=False))
    messages = []
    report = run_bench(config, write=False, log=messages.append)
    first, second = [who for r, who in order if r == 0], [who for r, who in order if r == 1]
    assert len(first) == 2 and second == first[::-1]  # round 2 starts at the second config
    # the log and the samples stay in config order
    assert all(len(r["latency"]["forward"]["samples"]) == 2 for r in report["results"])
    assert "round r starting at config r mod n" in report["machine"]["timing"]


def test_a_cuda_run_reports_the_gpu_peak_beside_host_memory(smoke_report):
    from mgtq.bench.report import compute_ratios, results_of, to_markdown

    report = json.loads(smoke_report.read_text())
    assert "GPU peak" not in to_markdown(report)  # a CPU run has none
    for result, allocated in zip(report["results"], (4e9, 1e9)):  # what case.py records on CUDA
        result["memory"]["cuda_build"] = {"max_memory_reserved": allocated, "max_memory_allocated": allocated / 2}
        result["memory"]["cuda_inference"] = {"max_memory_reserved": allocated, "max_memory_allocated": allocated}
    report["ratios"] = compute_ratios(results_of(report))
    assert report["ratios"]["scq"]["gpu_peak_vs_bf16"] == 0.25
    report["results"].append({**report["results"][1], "label": "w4a8", "status": "failed", "message": "boom"})
    table = [line for line in to_markdown(report).splitlines() if line.startswith("| ")]
    assert "GPU peak MB" in table[0]
    assert "| 1,000 | 0.25 |" in next(line for line in table if line.startswith("| scq |"))
    assert len({line.count("|") for line in table}) == 1  # every row, a failed one too, has the header's columns


@pytest.mark.parametrize("code, hint", [(-9, True), (137, True), (0xC0000017, True), (1, False), (-11, False)])
def test_a_case_process_that_ran_out_of_memory_is_said_so_on_every_system(code, hint):
    # -9 / 137: SIGKILL from Linux's OOM killer (a shell's 128 + 9); 0xC0000017: Windows' STATUS_NO_MEMORY.
    import io

    from mgtq.bench import runner

    class Ended:
        stdout = io.StringIO("")

        def wait(self):
            return code

    worker = runner.Worker.__new__(runner.Worker)
    worker._process = Ended()
    with pytest.raises(runner.ChildError, match=rf"exited with code {code}") as failed:
        worker._read()
    assert ("(killed: out of memory?)" in str(failed.value)) == hint
