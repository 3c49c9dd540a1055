"""`run_bench(config)`: every case in its own process, then ratios and the report files.

Isolation "spawn" (the default) runs each case in a fresh `python -m mgtq.bench.case` process, so its
address space and peak RSS are its own; a baseline process that does nothing but the imports is
measured the same way, so readers can subtract it themselves (nothing is subtracted here). Isolation
"none" runs everything in this process.

Interleaved rounds (the default, `MeasureSettings.interleave`): every case is built and warmed up once,
all are held at once, and round after round each case in turn times one forward, each case first in
turn (A B C, B C A, C A B …: the first forward of a round follows the longest wait); then each finishes (whole image, profile) one after the other. Drift of the machine then lands on
every case of a round alike, and the report's ratios are medians of per-round ratios (mgtq.bench.report).
Memory: all cases are resident together. Sequential: one case after another, each timing all its forwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from mgtq.bench import memory, report
from mgtq.bench.config import BenchCase, BenchConfig
from mgtq.bench.result import CaseResult
from mgtq.bench.source import ModelSource, resolve_model, token_grid, transformer_config

ISOLATION = {"spawn": "fresh Python interpreter per case",
             "none": "all cases in one process (peak memory is NOT per case)"}


# How a process that ran out of memory ends: SIGKILL (Linux's OOM killer, macOS's memory pressure), as a shell
# reports it (128 + 9), or Windows' STATUS_NO_MEMORY (no OOM killer there: a commit the page file cannot back).
_OUT_OF_MEMORY_EXITS = frozenset({-9, 137, 0xC0000017})


class ChildError(RuntimeError):
    """A case process failed; the message carries its traceback or exit code."""


class Worker:
    """A payload (mgtq.bench.case.make_payload) running here or in its own case process.

    For a "case", `timed` says whether its forwards are timed (not when skipped or in offload mode);
    `time_forwards` then times more, `finish` returns its CaseResult dict. Other entries: `result`.
    """

    def __init__(self, payload: dict, in_process: bool, folder: str | Path):
        self._session = self._process = None
        self.result = None
        if in_process:
            from mgtq.bench import case

            if payload["entry"] in case.ONE_SHOT:
                self.result = case.ONE_SHOT[payload["entry"]](payload)
            else:
                self._session = case.CaseSession(payload)
                self.timed = self._session.timed
            return
        request = Path(folder) / f"payload-{id(self)}.json"
        request.write_text(json.dumps(payload))
        self._process = subprocess.Popen([sys.executable, "-m", "mgtq.bench.case", str(request)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = self._read()
        self.result, self.timed = first.get("ok"), first.get("timed")
        if self.result is not None:
            self.close()

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            hint = " (killed: out of memory?)" if code in _OUT_OF_MEMORY_EXITS else ""
            raise ChildError(f"case process exited with code {code}{hint} without a result")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise ChildError(f"case failed: {answer['error']}")
        return answer

    def _ask(self, request: dict) -> dict:
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:  # the process is gone: _read says how it ended
            pass
        return self._read()

    def time_forwards(self, n: int, round_index: int | None, budget_s: float | None) -> list[float]:
        """Up to `n` timed forwards (none once the case spent `budget_s` on forwards); their seconds."""
        if self._session is not None:
            return self._session.time_forwards(n, round_index, budget_s)
        return self._ask({"op": "time", "n": n, "round": round_index, "budget_s": budget_s})["samples"]

    def finish(self) -> dict:
        """The case's CaseResult dict (whole image, memory, profile measured now); the process exits."""
        if self._session is not None:
            return self._session.finish()
        result = self._ask({"op": "finish"})["ok"]
        self.close()
        return result

    def close(self) -> None:
        if self._process is not None:
            with contextlib.suppress(BrokenPipeError):  # a process that died leaves its pipe broken
                self._process.stdin.close()
            self._process.wait()
            self._process = None


def run_cases(cases: list[BenchCase], payloads: list[dict], config: BenchConfig, folder: str,
              log: Callable[[str], None]) -> tuple[list[CaseResult], list]:
    """(results in case order, load average at the start of each interleaved round); see the module docstring."""
    measure, in_process = config.measure, config.isolation == "none"
    interleave = measure.interleave and measure.latency
    workers: list[Worker | None] = []
    results: list[CaseResult | None] = []
    loadavgs: list = []

    def start(case: BenchCase, payload: dict) -> None:
        log(f"{case.label}: building and warming up …")
        try:
            workers.append(Worker(payload, in_process, folder))
            results.append(None)
        except ChildError as err:  # a format that fails is a bug: reported as failed, the run goes on
            workers.append(None)
            results.append(_failed(case, err, log))

    def finish(i: int) -> None:
        if workers[i] is not None:
            try:
                results[i] = CaseResult.from_dict(workers[i].finish())
                log(results[i].one_line())
            except ChildError as err:
                results[i] = _failed(cases[i], err, log)

    def time_forwards(i: int, n: int, round_index: int | None) -> list[float]:
        """Case i's timed forwards; a case process that dies meanwhile (the OOM killer, say) is reported as
        failed and the others go on, as one that fails while building is."""
        try:
            return workers[i].time_forwards(n, round_index, measure.budget_s)
        except ChildError as err:
            results[i] = _failed(cases[i], err, log)
            workers[i].close()
            workers[i] = None
            return []

    try:
        if not interleave:
            for i, (case, payload) in enumerate(zip(cases, payloads)):
                start(case, payload)
                if workers[i] is not None:
                    time_forwards(i, measure.repeats, None)
                finish(i)
            return results, loadavgs
        for case, payload in zip(cases, payloads):
            start(case, payload)
        timed = [i for i, w in enumerate(workers) if w is not None and w.timed]
        for r in range(measure.repeats if timed else 0):
            loadavgs.append(memory.loadavg())
            seconds = {}
            for k in round_order(len(timed), r):
                i = timed[k]
                seconds[k] = time_forwards(i, 1, r) if workers[i] is not None else []
            log(f"round {r + 1}/{measure.repeats}: " + ", ".join(
                f"{seconds[k][0]:.3g} s" if seconds[k] else "–" for k in range(len(timed))))
        for i in range(len(cases)):
            finish(i)
        return results, loadavgs
    finally:
        for worker in workers:
            if worker is not None:
                worker.close()


def round_order(n: int, r: int) -> list[int]:
    """The order in which round `r` times `n` configs: it starts at config r mod n (over n rounds each leads
    once; with fewer rounds than configs, the first ones lead), so that whatever a place in the round costs
    (the first forward after the round's bookkeeping, the one whose process waited longest) does not land on
    one config, the bf16 baseline above all, every round."""
    return [(r + i) % n for i in range(n)] if n else []


def _failed(case: BenchCase, err: ChildError, log: Callable[[str], None]) -> CaseResult:
    root = str(Path(__file__).resolve().parents[2]) + os.sep  # reports are shared: no install paths in them
    result = CaseResult.of(case, status="failed", message=str(err).replace(root, ""))
    log(result.one_line())
    return result


# ------------------------------------------------------------------------------------- machine
def machine_info(config: BenchConfig) -> dict:
    """Top-level facts a reader needs to judge the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    from mgtq.native.cpu import cpu_isa, cpu_model
    from mgtq.quantization.kernels import cpu_class

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    try:
        import psutil

        total_memory = psutil.virtual_memory().total
    except ImportError:
        total_memory = None
    return {
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "isa": cpu_isa(), "cpu_class": cpu_class(),
        "torch_threads": config.num_threads, "torch_version": torch.__version__, "mgtq_version": installed("mgtq"),
        "mgtq_commit": source_commit(),
        "torchao_version": installed("torchao"), "optimum_quanto_version": installed("optimum-quanto"),
        "python": platform.python_version(), "platform": platform.platform(), "device": config.device,
        "cuda_device": (torch.cuda.get_device_name(torch.device(config.device)) if config.device.startswith("cuda")
                        else None),
        "isolation": ISOLATION[config.isolation], "memory_total_bytes": total_memory,
        "loadavg_start": memory.loadavg(),
    }


def source_commit() -> str | None:
    """The commit of the checkout mgtq runs from ("+dirty" with uncommitted changes to tracked files), so a report
    says which code made it; None for an installed wheel or where git is not at hand."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def model_info(source: ModelSource) -> dict:
    """The model section of the report: the source plus the shapes the timings refer to."""
    from mgtq.models.random import empty_transformer

    config = transformer_config(source)
    meta = empty_transformer(config, torch.bfloat16)
    h, w = token_grid(source)
    f = 2 if config.get("downsample", True) else 1
    return {
        **source.to_dict(), "transformer_params": sum(p.numel() for p in meta.parameters()),
        "linear_layers": sum(isinstance(m, torch.nn.Linear) for m in meta.modules()),
        "token_grid": [h, w], "transformer_tokens": (h // f) * (w // f), "text_tokens": source.text_length,
    }


# ---------------------------------------------------------------------------------------- run
def run_bench(config: BenchConfig, write: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every case of `config` and return the report dict (see mgtq.bench.report).

    With `write`, the JSON and the Markdown are written to `config.output_paths(...)`.
    """
    from mgtq.bench.build import needs_input_scales
    from mgtq.bench.case import make_payload

    started = time.perf_counter()
    source = resolve_model(config.model, config.text_encoder)
    for note in source.notes:
        log(f"note: {note}")
    cases = config.cases()
    in_process = config.isolation == "none"

    def payload(entry: str, case: BenchCase | None = None, scales=None) -> dict:
        return make_payload(entry, source, case, config.measure, config.num_threads, config.device, config.seed,
                            scales)

    machine = machine_info(config)
    with tempfile.TemporaryDirectory(prefix="mgtq-bench-") as folder:
        baseline = Worker(payload("baseline"), in_process, folder).result if config.measure.memory else None
        scales, calibration = None, None
        if needs_input_scales(source, config.formats):
            log("static int8 scales: one bf16 forward on random inputs …")
            calibration = Worker(payload("scales"), in_process, folder).result
            scales = calibration["input_scales"]
        interleave = config.measure.interleave and config.measure.latency
        if interleave:
            machine["timing"] = (f"interleaved rounds: {config.measure.repeats} rounds, one timed forward per config "
                                 "per round, round r starting at config r mod n (with as many rounds as configs, each "
                                 "leads once), every config held in its own live process across the rounds")
        else:
            machine["timing"] = "sequential: each config times all its forwards in a row, one config after another"
        results, loadavgs = run_cases(cases, [payload("case", c, scales) for c in cases], config, folder, log)
    if interleave:
        machine["loadavg_rounds"] = loadavgs
    machine["loadavg_end"] = memory.loadavg()
    out = report.assemble(
        machine=machine, model=model_info(source), settings=config.to_dict(), cases=cases, results=results,
        baseline=baseline, calibration=None if calibration is None else {"seconds": calibration["seconds"],
                                                                         "layers": len(scales)},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), wall_s=time.perf_counter() - started,
    )
    if write:
        paths = config.output_paths(source.slug)
        report.write_outputs(out, paths)
        log("wrote " + ", ".join(str(p) for p in paths.values()))
    return out
