"""`run_bench(config)`: every case in its own process, then ratios, goals and the report files.

Isolation: by default each case runs in a fresh process forked from a forkserver that preloaded
torch + mgtq (so a case does not pay the ≈5–15 s imports, yet its address space and peak RSS
are its own). A baseline process that does nothing but those imports is measured the same way,
so readers can subtract it themselves; nothing is subtracted here.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from datetime import datetime, timezone
from typing import Callable

import torch

from mgtq.bench import report
from mgtq.bench.config import BenchConfig, BenchCase
from mgtq.bench.source import ModelSource, resolve_model, token_grid, transformer_config

CHILD_MODULE = "mgtq.bench.child"


# ----------------------------------------------------------------------------------- isolation
def _child_entry(entry: str, payload: dict, conn) -> None:
    from mgtq.bench import child

    try:
        conn.send(("ok", child.ENTRY_POINTS[entry](payload)))
    except BaseException as err:  # report it to the parent instead of dying silently
        import traceback

        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"))
    finally:
        conn.close()


class Isolation:
    """Runs child entry points ("case", "calibrate", "baseline") per the configured isolation."""

    def __init__(self, mode: str):
        self.mode = mode
        self._ctx = None
        if mode in ("forkserver", "spawn"):
            method = mode if mode in multiprocessing.get_all_start_methods() else "spawn"
            self.mode = method
            self._ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                self._ctx.set_forkserver_preload([CHILD_MODULE])

    @property
    def description(self) -> str:
        return {
            "forkserver": "fresh process per case, forked from a server that preloaded torch + mgtq",
            "spawn": "fresh Python interpreter per case",
            "none": "all cases in one process (peak memory is NOT per case)",
        }[self.mode]

    def run(self, entry: str, payload: dict) -> dict:
        if self._ctx is None:
            from mgtq.bench import child

            return child.ENTRY_POINTS[entry](payload)
        receiver, sender = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_child_entry, args=(entry, payload, sender), daemon=True)
        process.start()
        sender.close()
        try:
            status, value = receiver.recv()
        except EOFError:
            status, value = "error", "the case process died without a result (killed: out of memory?)"
        finally:
            process.join()
            receiver.close()
        if status != "ok":
            raise ChildError(f"{entry} failed (exit code {process.exitcode}): {value}")
        return value


class ChildError(RuntimeError):
    """A case process failed; the message carries its traceback."""


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
        isa = [x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if f" {x}" in flags]
    except OSError:
        isa = []
    return {
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model, "isa": isa, "torch_threads": config.num_threads,
        "torch_version": torch.__version__, "mgtq_version": _version("mgtq"), "torchao_version": _version("torchao"),
        "optimum_quanto_version": _version("optimum-quanto"), "python": platform.python_version(),
        "platform": platform.platform(), "device": config.device,
        "cuda_device": torch.cuda.get_device_name(0) if config.device.startswith("cuda") else None,
        "isolation": isolation.description, "memory_total_bytes": _total_memory(),
        "loadavg_start": _loadavg(),
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


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def model_info(source: ModelSource) -> dict:
    """The model section of the report: the source plus the shapes the timings refer to."""
    from mgtq.bench.formats import empty_transformer

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
def run_bench(config: BenchConfig, progress: bool = True, write: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run every case of `config` and return the report dict (see mgtq.bench.report.SCHEMA).

    With `write`, the JSON, Markdown and PNG files are written to `config.output_paths(...)`.
    """
    from tqdm.auto import tqdm

    from mgtq.bench.child import make_payload
    from mgtq.bench.formats import needs_calibration

    started = time.perf_counter()
    source = resolve_model(config.model)
    for note in source.notes:
        log(f"note: {note}")
    isolation = Isolation(config.isolation)
    cases = config.cases()
    machine = machine_info(config, isolation)
    threads = config.num_threads

    def payload(case: BenchCase | None, scales=None) -> dict:
        return make_payload(source, case, config.measure, threads, config.device, config.seed, scales)

    memory_baseline = isolation.run("baseline", payload(None)) if config.measure.memory else None
    scales, calibration = None, None
    if needs_calibration(source, config.formats):
        log("calibrating static int8 scales: one bf16 forward on random inputs …")
        calibration = isolation.run("calibrate", payload(None))
        scales = calibration["input_scales"]

    results = []
    bar = tqdm(cases, desc="mgtq bench", unit="config", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.label)
        try:
            result = isolation.run("case", payload(case, scales))
        except ChildError as err:
            result = report.failed_result(case, str(err))
            log(f"{case.label}: FAILED — {str(err).splitlines()[0]}")
        log(report.one_line(result))
        results.append(result)
    machine["loadavg_end"] = _loadavg()

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
