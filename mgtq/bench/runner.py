"""`run_bench(config)`: every case in its own process, then ratios and the report files.

Isolation: by default each case runs in a fresh process forked from a server process that
imported torch + mgtq (so a case does not pay the ≈5–15 s imports, yet its address space and
peak RSS are its own). A baseline process that does nothing but those imports is measured the same way,
so readers can subtract it themselves; nothing is subtracted here.

Interleaved rounds (the default, `MeasureSettings.interleave`): every case is built and warmed up
once in its own process (a fresh interpreter, or in this process with isolation "none"), all
are held at once, and round after round each case in turn times one forward (A B C … A B C …)
in the same processes; then each finishes (whole image, profile) one after the other. Drift of
the machine then lands on every case of a round alike, and the report's ratios are medians of
per-round ratios with their min–max (mgtq.bench.report). Memory: all cases are resident together.
"""

from __future__ import annotations

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

CHILD_MODULE = "mgtq.bench.child"


# ----------------------------------------------------------------------------------- isolation
class ChildError(RuntimeError):
    """A case process failed; the message carries its traceback or exit code."""


class Isolation:
    """Runs child entry points ("case", "calibrate", "baseline") in the configured isolation.

    forkserver: a `python -m mgtq.bench.child serve` process that imported torch + mgtq forks one
    process per request. spawn: a fresh `python -m mgtq.bench.child ENTRY …` per request. none:
    in this process. Payloads and results travel as JSON files in a private temporary folder.
    Use as a context manager (the server and the folder are removed on exit).
    """

    def __init__(self, mode: str):
        if mode == "forkserver" and not hasattr(os, "fork"):
            mode = "spawn"
        self.mode = mode
        self._server: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="mgtq-bench-")
        self._count = 0

    @property
    def description(self) -> str:
        return {
            "forkserver": "fresh process per case, forked from a server that imported torch + mgtq",
            "spawn": "fresh Python interpreter per case",
            "none": "all cases in one process (peak memory is NOT per case)",
        }[self.mode]

    def __enter__(self) -> "Isolation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.stdin.close()
            self._server.wait()
            self._server = None
        self._tmp.cleanup()

    def run(self, entry: str, payload: dict) -> dict:
        if self.mode == "none":
            from mgtq.bench import child

            return child.ENTRY_POINTS[entry](payload)
        self._count += 1
        result = Path(self._tmp.name) / f"result-{self._count}.json"
        if self.mode == "forkserver":
            code = self._fork(entry, payload, result)
        else:
            request = Path(self._tmp.name) / f"payload-{self._count}.json"
            request.write_text(json.dumps(payload))
            code = subprocess.run([sys.executable, "-m", CHILD_MODULE, entry, str(request), str(result)]).returncode
        if not result.exists():
            hint = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise ChildError(f"{entry} process exited with code {code}{hint} without a result")
        outcome = json.loads(result.read_text())
        if "error" in outcome:
            raise ChildError(f"{entry} failed: {outcome['error']}")
        return outcome["ok"]

    def _fork(self, entry: str, payload: dict, result: Path) -> int:
        if self._server is None:
            self._server = subprocess.Popen([sys.executable, "-m", CHILD_MODULE, "serve"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True)
        self._server.stdin.write(json.dumps({"entry": entry, "payload": payload, "result": str(result)}) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise ChildError(f"the bench fork server died (exit code {self._server.poll()})")
        return json.loads(line)["exit"]


class CaseWorker:
    """One case held alive for interleaved rounds: a `child.CaseSession` here or in its own process.

    `timed` is False for a case whose forwards are not timed: skipped while building, or offload
    mode (its result is in `finish()` all the same).
    """

    def __init__(self, payload: dict, in_process: bool, folder: Path):
        self._session = None
        self._process: subprocess.Popen | None = None
        if in_process:
            from mgtq.bench.child import CaseSession

            self._session = CaseSession(payload)
            self.timed = self._session.timed
            return
        request = folder / f"hold-{id(self)}.json"
        request.write_text(json.dumps(payload))
        self._process = subprocess.Popen([sys.executable, "-m", CHILD_MODULE, "hold", str(request)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.timed = bool(self._read()["timed"])

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            hint = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise ChildError(f"case process exited with code {code}{hint} without a result")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise ChildError(f"case failed: {answer['error']}")
        return answer

    def _ask(self, request: dict) -> dict:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return self._read()

    def time_forward(self, round_index: int, budget_s: float | None) -> list[float]:
        """One timed forward (none once the case spent `budget_s` on forwards)."""
        if self._session is not None:
            return self._session.time_forwards(1, round_index, budget_s)
        return self._ask({"op": "time", "n": 1, "round": round_index, "budget_s": budget_s})["samples"]

    def finish(self) -> dict:
        """The case's CaseResult dict (whole image, memory, profile measured now); the process exits."""
        if self._session is not None:
            return self._session.finish()
        result = self._ask({"op": "finish"})["ok"]
        self.close()
        return result

    def close(self) -> None:
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait()
            self._process = None


def run_interleaved(cases: list[BenchCase], payloads: list[dict], rounds: int, budget_s: float | None,
                    in_process: bool, log: Callable[[str], None]) -> tuple[list[CaseResult], list]:
    """(results in case order, load average at the start of each round): see the module docstring."""
    workers: list[CaseWorker | None] = []
    results: list[CaseResult | None] = []
    loadavgs: list = []
    with tempfile.TemporaryDirectory(prefix="mgtq-bench-") as folder:
        try:
            for case, payload in zip(cases, payloads):
                log(f"{case.label}: building and warming up …")
                try:
                    workers.append(CaseWorker(payload, in_process, Path(folder)))
                    results.append(None)
                except ChildError as err:
                    workers.append(None)
                    results.append(_failed(case, err, log))
            timed = [w for w in workers if w is not None and w.timed]
            for r in range(rounds if timed else 0):
                loadavgs.append(memory.loadavg())
                seconds = [w.time_forward(r, budget_s) for w in timed]
                log(f"round {r + 1}/{rounds}: " + ", ".join(f"{s[0]:.3g} s" if s else "–" for s in seconds))
            for i, (case, worker) in enumerate(zip(cases, workers)):
                if worker is None:
                    continue
                try:
                    results[i] = CaseResult.from_dict(worker.finish())
                    log(results[i].one_line())
                except ChildError as err:
                    results[i] = _failed(case, err, log)
        finally:
            for worker in workers:
                if worker is not None:
                    worker.close()
    return results, loadavgs


def _failed(case: BenchCase, err: ChildError, log: Callable[[str], None]) -> CaseResult:
    result = CaseResult.of(case, status="failed", message=_without_install_path(str(err)))
    log(result.one_line())
    return result


# ------------------------------------------------------------------------------------- machine
def machine_info(config: BenchConfig, isolation: Isolation) -> dict:
    """Top-level facts a reader needs to judge the numbers."""
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        isa = [x for x in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8",
                                               "amx_bf16") if f" {x}" in flags]
    except OSError:
        isa = []
    from mgtq.quantization.kernels import cpu_class

    return {
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model, "isa": isa, "cpu_class": cpu_class(),
        "torch_threads": config.num_threads,
        "torch_version": torch.__version__, "mgtq_version": _version("mgtq"), "torchao_version": _version("torchao"),
        "optimum_quanto_version": _version("optimum-quanto"), "python": platform.python_version(),
        "platform": platform.platform(), "device": config.device,
        "cuda_device": torch.cuda.get_device_name(0) if config.device.startswith("cuda") else None,
        "isolation": isolation.description, "memory_total_bytes": _total_memory(),
        "loadavg_start": memory.loadavg(),
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _total_memory() -> int | None:
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        return None



def model_info(source: ModelSource) -> dict:
    """The model section of the report: the source plus the shapes the timings refer to."""
    from mgtq.testing import empty_transformer

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
def _without_install_path(text: str) -> str:
    """A traceback with mgtq's install folder removed: reports are committed and shared."""
    root = str(Path(__file__).resolve().parents[2])
    return text.replace(root + os.sep, "")


def _run_case(isolation: Isolation, case: BenchCase, payload: dict, log: Callable[[str], None]) -> CaseResult:
    try:
        result = CaseResult.from_dict(isolation.run("case", payload))
    except ChildError as err:  # an mgtq format that fails is a bug: reported as failed, the run goes on
        return _failed(case, err, log)
    log(result.one_line())
    return result


def run_bench(config: BenchConfig, progress: bool = True, write: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run every case of `config` and return the report dict (see mgtq.bench.report.SCHEMA).

    With `write`, the JSON, Markdown and PNG files are written to `config.output_paths(...)`.
    """
    from tqdm.auto import tqdm

    from mgtq.bench.child import make_payload
    from mgtq.bench.formats import needs_calibration

    started = time.perf_counter()
    source = resolve_model(config.model, config.text_encoder)
    for note in source.notes:
        log(f"note: {note}")
    cases = config.cases()
    threads = config.num_threads

    def payload(case: BenchCase | None, scales=None) -> dict:
        return make_payload(source, case, config.measure, threads, config.device, config.seed, scales)

    with Isolation(config.isolation) as isolation:
        machine = machine_info(config, isolation)
        memory_baseline = isolation.run("baseline", payload(None)) if config.measure.memory else None
        if memory_baseline is not None and isolation.mode == "forkserver":
            # A forked process has not touched the shared libraries' pages yet; a fresh interpreter has.
            with Isolation("spawn") as fresh:
                memory_baseline["fresh_interpreter_rss"] = fresh.run("baseline", payload(None))["rss"]
        scales, calibration = None, None
        if needs_calibration(source, config.formats):
            log("calibrating static int8 scales: one bf16 forward on random inputs …")
            calibration = isolation.run("calibrate", payload(None))
            scales = calibration["input_scales"]
        results = []
        measure = config.measure
        if measure.interleave and measure.latency:
            machine["timing"] = (f"interleaved rounds: {measure.repeats} rounds, one timed forward per config per "
                                 "round, every config held in its own live process across the rounds")
            results, machine["loadavg_rounds"] = run_interleaved(
                cases, [payload(c, scales) for c in cases], measure.repeats, measure.budget_s,
                isolation.mode == "none", log)
        else:
            machine["timing"] = "sequential: each config times all its forwards in a row, one config after another"
            bar = tqdm(cases, desc="mgtq bench", unit="config", disable=not progress)
            for case in bar:
                bar.set_postfix_str(case.label)
                results.append(_run_case(isolation, case, payload(case, scales), log))
    machine["loadavg_end"] = memory.loadavg()

    out = report.assemble(
        machine=machine, model=model_info(source), settings=config.to_dict(), cases=cases, results=results,
        baseline=memory_baseline, calibration=None if calibration is None else {"seconds": calibration["seconds"],
                                                                                "layers": len(scales)},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), wall_s=time.perf_counter() - started,
    )
    if write:
        paths = config.output_paths(source.slug)
        report.write_outputs(out, paths)
        out_paths = {k: str(v) for k, v in paths.items()}
        log("wrote " + ", ".join(out_paths.values()))
    return out
