"""One benchmark case, run in its own process so its peak memory is its own.

    python -m mgtq.bench.child case PAYLOAD.json RESULT.json     # one case by hand ("spawn" isolation)
    python -m mgtq.bench.child serve                             # the fork server the runner uses
    python -m mgtq.bench.child hold PAYLOAD.json                 # one case timed in interleaved rounds

`run_case(payload) -> dict` builds the pipeline in the case's format (or peer), applies TomeMGT,
then measures: weight bytes, RSS after building, transformer forward latency (CFG batch 2),
one whole image (N sampler steps + VQ decode; in offload mode the transformer is freed before the
VQ decoder is loaded), peak RSS, and optionally a profile. `calibrate(payload)` computes the
static int8 scales the W4A8/SCQ cases share; `baseline(payload)` only reports the memory of a
process that imported torch + mgtq. Payloads and results are plain JSON-able dicts.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Callable

import torch

import mgtq  # noqa: F401  (imported here so every case process, and the baseline, pays the same imports)
from mgtq.bench import memory
from mgtq.bench.config import EXTRAPOLATE_STEPS, BenchCase, MeasureSettings
from mgtq.bench.latency import CallTimer, Timing, time_call, time_repeated
from mgtq.bench.result import CaseResult
from mgtq.bench.source import BENCH_PROMPT, ModelSource, forward_inputs


# ------------------------------------------------------------------------------------ payloads
def make_payload(source: ModelSource, case: BenchCase | None, measure: MeasureSettings, threads: int,
                 device: str = "cpu", seed: int = 0, input_scales: dict[str, float] | None = None) -> dict:
    """The JSON-able description of one child run."""
    return {"source": source.to_dict(), "case": None if case is None else case.to_dict(),
            "measure": measure.to_dict(), "threads": threads, "device": device, "seed": seed,
            "input_scales": input_scales}


def _setup(payload: dict) -> None:
    torch.set_num_threads(int(payload["threads"]))


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None



# ------------------------------------------------------------------------------------ building
def build_case_transformer(source: ModelSource, case: BenchCase, input_scales, seed: int, device: str,
                           inputs: dict) -> tuple[torch.nn.Module, list[str], str, float]:
    """(transformer, notes, scheme, seconds a peer spent quantizing + calibrating) for a format or a peer."""
    from mgtq.bench.formats import build_transformer_in_format

    if not case.is_peer:
        model, notes = build_transformer_in_format(source, case.target, input_scales, seed, device)
        return model, notes, _format_scheme(case.target), 0.0
    from mgtq.bench.peers import PEERS

    peer = PEERS[case.target]
    # The peer quantizes the bf16 model in place (its own way of getting there: peak includes bf16).
    model, notes = build_transformer_in_format(source, "bf16", None, seed, device)
    start = time.perf_counter()
    with torch.inference_mode():
        peer.apply(model, lambda: model(**inputs))
    notes.append(f"{case.target}: quantized in place from the bf16 model, so its build peak (peak_rss_build) includes "
                 "the bf16 weights; its inference peak is measured after that")
    return model.eval(), notes, f"{peer.family}: {peer.scheme}", time.perf_counter() - start


def _format_scheme(fmt: str) -> str:
    from mgtq.bench.formats import base_format, group_size_of

    group = group_size_of(fmt)
    if group is not None:
        return f"{_format_scheme(base_format(fmt))}; W4A16 layers in groups of {group} input columns"
    return {
        "fp32": "mgtq: fp32 weights and activations",
        "bf16": "mgtq: bf16 weights and activations",
        "w4a16": "mgtq: every Linear W4Linear (int4 per-channel weights, bf16 activations)",
        "w4a8": "mgtq: every Linear W4A8Linear (int4 weights, static int8 activations, int8 GEMM)",
        "scq": "mgtq: SCQ — a third of the Linears W4A8, the rest W4A16",
        "w4a8-cached": "mgtq: w4a8 with the opt-in int8 weight cache (oneDNN prepacked)",
        "scq-cached": "mgtq: scq with the opt-in int8 weight cache on its W4A8 layers",
    }[fmt]


def build_pipeline(source: ModelSource, transformer, dtype: torch.dtype, steps: int, seed: int, device: str,
                   vq_empty: bool):
    """MGTPipeline around `transformer`; with `vq_empty` the VQ is a meta-device placeholder.

    A folder's other components and settings load through `MGTPipeline.from_pretrained` (so a separate
    CLIP folder works as it does for `mgtq.load`); a preset gets random stand-ins."""
    from mgtq.bench.source import build_vq, pipeline_settings, random_text_parts
    from mgtq.pipeline import MGTPipeline

    vq = build_vq(source, seed, empty=True) if vq_empty else None
    if source.kind == "preset":
        tokenizer, text_encoder = random_text_parts(source, dtype, seed)
        pipe = MGTPipeline(transformer, vq or build_vq(source, seed), text_encoder, tokenizer,
                           pipeline_settings(source, steps))
    else:
        pipe = MGTPipeline.from_pretrained(source.path, text_encoder=source.text_encoder, torch_dtype=dtype,
                                           transformer=transformer, vqvae=vq)
        pipe.settings = pipeline_settings(source, steps, pipe.settings)
    pipe.text_encoder.to(device)
    if not vq_empty:
        pipe.vqvae.to(device)
    return pipe


# -------------------------------------------------------------------------------------- images
def timed_image(pipe, steps: int, sync: Callable[[], None], warm_decode: bool = True,
                phases: memory.PhasePeaks | None = None) -> dict:
    """One whole image at the pipeline's resolution: text encoding, `steps` sampler steps, VQ decode.

    Returns seconds: text_s (prompt + negative prompt), tokens_s (text + sampling),
    per_step_s ((tokens_s − text_s) / steps), decode_s, total_s, the transformer calls inside the
    loop, and a labeled extrapolation to EXTRAPOLATE_STEPS steps. With `phases`, the peak RSS of
    the "sampling" and "decode" phases is recorded there.
    """
    phases = phases or memory.PhasePeaks()
    with torch.inference_mode():
        text_s, _ = time_call(lambda: (pipe.encode_prompt([BENCH_PROMPT]), pipe.encode_prompt([""])), sync)
        timer = CallTimer(pipe.transformer, sync)
        with timer, phases.phase("sampling"):
            tokens_s, out = time_call(lambda: pipe(BENCH_PROMPT, num_inference_steps=steps, seed=0,
                                                   output_type="latent", progress=False), sync)
        calls = (timer.durations, timer.cpu_durations)
        del timer
        with phases.phase("decode"):
            if warm_decode:
                pipe.decode_tokens(out.tokens)
            decode_s, _ = time_call(lambda: pipe.decode_tokens(out.tokens), sync)
    return _image_record(steps, text_s, tokens_s, decode_s, calls, out.nfe)


def _image_record(steps, text_s, tokens_s, decode_s, calls, nfe, vq_load_s=None) -> dict:
    per_step = max(tokens_s - text_s, 0.0) / steps
    total = tokens_s + decode_s + (vq_load_s or 0.0)
    return {
        "unit": "s", "steps": steps, "nfe": nfe, "text_s": text_s, "tokens_s": tokens_s, "per_step_s": per_step,
        "decode_s": decode_s, "vq_load_s": vq_load_s, "total_s": total, "transformer_calls_s": list(calls[0]),
        "transformer_calls_cpu_s": list(calls[1]),
        "extrapolated_steps": EXTRAPOLATE_STEPS,
        "extrapolated_total_s": text_s + EXTRAPOLATE_STEPS * per_step + decode_s + (vq_load_s or 0.0),
    }


def generate_offloaded(pipe, load_vq: Callable[[], torch.nn.Module], steps: int,
                       sync: Callable[[], None] = lambda: None,
                       phases: memory.PhasePeaks | None = None) -> tuple[dict, bool, list]:
    """The paper's CPU-offloading mode: the transformer makes all tokens, is freed, then the VQ loads.

    `pipe.vqvae` is a placeholder until `load_vq()` is called, which happens only after
    `pipe.transformer` was dropped and garbage-collected. The caller must hold no other reference
    to the transformer. Returns (image timings, whether the transformer was really freed, images).
    With `phases`, the peak RSS of "sampling" and "decode" (VQ load + decode) is recorded there.
    """
    phases = phases or memory.PhasePeaks()
    with torch.inference_mode():
        text_s, _ = time_call(lambda: (pipe.encode_prompt([BENCH_PROMPT]), pipe.encode_prompt([""])), sync)
        timer = CallTimer(pipe.transformer, sync)
        with timer, phases.phase("sampling"):
            tokens_s, out = time_call(lambda: pipe(BENCH_PROMPT, num_inference_steps=steps, seed=0,
                                                   output_type="latent", progress=False), sync)
        calls = (timer.durations, timer.cpu_durations)
        del timer
        alive = weakref.ref(pipe.transformer)
        pipe.transformer = None
        gc.collect()
        freed = alive() is None
        with phases.phase("decode"):
            vq_load_s, vq = time_call(load_vq, sync)
            pipe.vqvae = vq
            decode_s, images = time_call(lambda: pipe.decode_tokens(out.tokens), sync)
    return _image_record(steps, text_s, tokens_s, decode_s, calls, out.nfe, vq_load_s), freed, images


# ------------------------------------------------------------------------------------ the case
class CaseSession:
    """One case, built and warmed up once, then timed on request (`time_forwards`), then `finish`-ed.

    The runner's interleaved rounds keep one session per case alive and ask each, in turn, for a
    timed forward, so that the machine's drift falls on every case alike. `run_case` is the
    same steps without interleaving. A peer that is unavailable or fails to build is reported as
    skipped (`ready` False); an mgtq format that fails raises (a bug).
    """

    def __init__(self, payload: dict):
        from mgtq.bench.peers import PEERS, unavailable_reason

        _setup(payload)
        self._wall = time.perf_counter()
        self._payload = payload
        self.source = ModelSource.from_dict(payload["source"])
        self.case = BenchCase.from_dict(payload["case"])
        self.measure = MeasureSettings.from_dict(payload["measure"])
        self.device = torch.device(payload["device"])
        self.result = CaseResult.of(self.case, family=PEERS[self.case.target].family if self.case.is_peer else "mgtq")
        self.result.loadavg = {"before": memory.loadavg(), "after": None}
        self.samples: list[float] = []
        self.cpu_samples: list[float] = []
        self.rounds: list[int] = []
        self.ready = False
        self._phase = contextlib.ExitStack()
        if self.case.is_peer:
            reason = unavailable_reason(self.case.target, self.device.type)
            if reason is not None:
                self.result.status, self.result.message = "skipped", reason
                return
        try:
            self._build_and_warm_up()
        except Exception as err:  # a failing peer is reported, the run goes on
            if not self.case.is_peer:
                raise
            self._phase.close()
            self._skip(err)
            return
        self.ready = True

    @property
    def timed(self) -> bool:
        """Whether this case's forwards are timed (offload mode only warms up)."""
        return self.ready and self.measure.latency and not self.case.offload

    def _skip(self, err: BaseException) -> None:
        from mgtq.bench.peers import PEERS

        self.result.status = "skipped"
        self.result.message = (f"{self.case.target} skipped: {PEERS[self.case.target].scheme} failed on "
                               f"{self.device.type} ({_one_line(err)})")

    def _build_and_warm_up(self) -> None:
        from mgtq.bench.formats import float_dtype_of

        case, source, measure, device, result = self.case, self.source, self.measure, self.device, self.result
        self.sync = _sync_fn(device)
        seed = int(self._payload["seed"])
        dtype = float_dtype_of(case.target) if not case.is_peer else torch.bfloat16
        self.inputs = forward_inputs(source, dtype, str(device), seed=seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        start = time.perf_counter()
        transformer, notes, scheme, calib_s = build_case_transformer(source, case, self._payload["input_scales"],
                                                                      seed, str(device), self.inputs)
        self.pipe = build_pipeline(source, transformer, dtype, measure.steps, seed, str(device),
                                   vq_empty=case.offload)
        if case.tome:
            from mgtq.merging import apply_tomemgt

            apply_tomemgt(self.pipe, ratio=case.tome, blocks=case.tome_blocks, **case.tome_options)
            notes.append(_TOME_NOTES[case.tome_blocks])
        if case.compile:
            self.pipe.compile()  # in place, per block: compiled by the warm-up forward
            notes.append("+compile: every transformer block under torch.compile(fullgraph=True) "
                         "(MGTPipeline.compile); compile time in the untimed warm-up")
        result.build_s = time.perf_counter() - start
        result.quantize_s = calib_s or None
        result.scheme, result.notes = scheme, notes

        result.weights = _weights_record(transformer)
        del transformer  # from here on only the pipeline holds it (offload mode must be able to free it)
        self.mem = _memory_after_build(device)
        self.phases = memory.PhasePeaks()
        self.mem["peak_reset_supported"] = self.phases.supported
        self._phase.enter_context(self.phases.phase("forwards"))
        # Untimed warm-up (offload mode too, so its steps compare; it also puts a forward in the peak).
        warm_up = measure.warmup if self.measure.latency and not case.offload else max(1, measure.warmup)
        forward = _forward_fn(self.pipe.transformer, self.inputs)
        self.warmup_s = [time_call(forward, self.sync)[0] for _ in range(warm_up)]  # the first compiles

    def time_forwards(self, n: int, round_index: int | None = None, budget_s: float | None = None) -> list[float]:
        """Time up to `n` forwards (fewer once `budget_s` seconds were spent on this case); their wall seconds."""
        if not self.timed:
            return []
        if budget_s is not None:
            budget_s -= sum(self.samples)
            if budget_s <= 0 and self.samples:
                return []
        timing = time_repeated(_forward_fn(self.pipe.transformer, self.inputs), 0, n, budget_s, self.sync)
        self.samples += timing.samples
        self.cpu_samples += timing.cpu_samples
        self.rounds += [len(self.rounds) if round_index is None else round_index] * len(timing.samples)
        return list(timing.samples)

    def finish(self) -> dict:
        """The whole image run, memory peaks, the profile; the CaseResult as a dict."""
        if self.ready:
            self._finish()
        self.result.loadavg["after"] = memory.loadavg()
        self.result.wall_s = time.perf_counter() - self._wall
        return self.result.to_dict()

    def _finish(self) -> None:
        from mgtq.bench.source import build_vq

        case, measure, device, result, sync, phases = (self.case, self.measure, self.device, self.result,
                                                       self.sync, self.phases)
        self._phase.close()  # the "forwards" phase ends
        latency: dict = {"unit": "s", "forward_batch": int(self.inputs["hidden_states"].shape[0]), "forward": None,
                         "warmup_s": self.warmup_s}
        if self.samples:
            latency["forward"] = Timing.of(self.samples, self.cpu_samples, self.rounds).to_dict()
        try:
            if case.offload:
                pipe, self.pipe = self.pipe, None
                image, freed, _ = generate_offloaded(pipe, lambda: build_vq(self.source, int(self._payload["seed"]))
                                                     .to(device), measure.steps, sync, phases)
                result.transformer_freed_before_decode = freed
            else:
                image = timed_image(self.pipe, measure.steps, sync, warm_decode=measure.warmup > 0, phases=phases)
        except Exception as err:
            if not case.is_peer:
                raise
            self._skip(err)
            return
        latency["image"] = image
        result.latency = latency
        mem = self.mem
        mem["phase_peaks"] = dict(phases.peaks)
        mem["peak_rss_inference"] = phases.overall if phases.supported else None
        mem["peak_rss_process"] = max(mem["peak_rss_build"], phases.overall)
        if device.type == "cuda":
            mem["cuda_inference"] = memory.cuda_peaks(device)
        result.memory = mem
        if measure.profile and not case.offload:  # last: the profiler's own memory must not count above
            result.profile = _profile(_forward_fn(self.pipe.transformer, self.inputs))


def run_case(payload: dict) -> dict:
    """Build and measure one case (see module docstring); never raises for a failing peer."""
    session = CaseSession(payload)
    session.time_forwards(session.measure.repeats, budget_s=session.measure.budget_s)
    return session.finish()


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _weights_record(transformer: torch.nn.Module) -> dict:
    """Weight bytes as held (see memory.transformer_weight_nbytes) and the Linear classes used."""
    weight_bytes, method = memory.transformer_weight_nbytes(transformer)
    layer_kinds: dict[str, int] = {}
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__:
            layer_kinds[type(module).__name__] = layer_kinds.get(type(module).__name__, 0) + 1
    return {"unit": "bytes", "transformer_bytes": weight_bytes, "method": method,
            "storage_bytes": memory.module_storage_nbytes(transformer), "linear_layers": layer_kinds}


def _memory_after_build(device: torch.device) -> dict:
    """Build peak, then RSS once garbage and freed heap are returned to the OS (see release_free_heap)."""
    peak_build = memory.peak_rss_bytes()
    gc.collect()
    trimmed = memory.release_free_heap()
    mem = {"unit": "bytes", "rss_after_build": memory.current_rss_bytes(), "peak_rss_build": peak_build,
           "heap_trimmed_after_build": trimmed}
    if device.type == "cuda":
        mem["cuda_build"] = memory.cuda_peaks(device)
        torch.cuda.reset_peak_memory_stats(device)
    return mem


_TOME_NOTES = {
    "joint": "TomeMGT on the 14 joint (MMDiT) blocks only: the paper's setting",
    "single": "TomeMGT on the single-stream blocks only (an ablation; the paper reports it failed on quality)",
    "all": "TomeMGT on joint and single-stream blocks (an ablation; the paper merges joint blocks only)",
}


def _forward_fn(model, inputs: dict) -> Callable[[], object]:
    def forward():
        with torch.inference_mode():
            return model(**inputs)

    return forward


def _profile(forward: Callable[[], object]) -> dict:
    from mgtq.bench.profile import profile_call

    return profile_call(forward)


# ------------------------------------------------------------------------- calibration, baseline
def calibrate(payload: dict) -> dict:
    """{"input_scales": {layer: float}, "seconds": s}: one CFG forward of the bf16 model on random inputs.

    The bf16 model is used because it is the fastest float model (the scales only decide int8
    clipping, which changes neither speed nor size).
    """
    from mgtq.bench.formats import calibrate_input_scales

    _setup(payload)
    start = time.perf_counter()
    scales = calibrate_input_scales(ModelSource.from_dict(payload["source"]), int(payload["seed"]),
                                    payload["device"])
    return {"input_scales": scales, "seconds": time.perf_counter() - start}


def baseline(payload: dict) -> dict:
    """Memory of a case process that only imported torch + mgtq (nothing built)."""
    _setup(payload)
    return {"unit": "bytes", "rss": memory.current_rss_bytes(), "peak_rss": memory.peak_rss_bytes(),
            "imports": ["torch", "mgtq"]}


ENTRY_POINTS = {"case": run_case, "calibrate": calibrate, "baseline": baseline}


def hold(payload: dict, requests, responses) -> int:
    """A `CaseSession` driven by JSON lines (the runner's interleaved rounds, see runner.CaseWorker).

    Answers {"timed": bool} once built (or {"error": traceback}); then each request
    {"op": "time", "n", "round", "budget_s"} with {"samples": [s]}, and {"op": "finish"} with
    {"ok": result} (or {"error": traceback}), after which the process exits.
    """
    def answer(message: dict) -> None:
        responses.write(json.dumps(message) + "\n")
        responses.flush()

    try:
        session = CaseSession(payload)
    except BaseException:
        answer({"error": traceback.format_exc()[-3000:]})
        return 1
    answer({"timed": session.timed})
    for line in requests:
        request = json.loads(line)
        try:
            if request["op"] == "time":
                answer({"samples": session.time_forwards(request["n"], request["round"], request.get("budget_s"))})
            elif request["op"] == "finish":
                answer({"ok": session.finish()})
                return 0
            else:
                answer({"error": f"unknown request {request['op']!r}"})
        except BaseException:
            answer({"error": traceback.format_exc()[-3000:]})
            return 1
    return 1  # the runner went away


def run_to_file(entry: str, payload: dict, result_path: str) -> None:
    """Run an entry point and write {"ok": result} or {"error": traceback} to `result_path` (atomically)."""
    from mgtq.utils import atomic_write_text

    try:
        outcome = {"ok": ENTRY_POINTS[entry](payload)}
    except BaseException:  # reported to the parent, which decides what a failure means
        outcome = {"error": traceback.format_exc()[-3000:]}
    atomic_write_text(result_path, json.dumps(outcome))


def _wait_or_orphaned(pid: int, requests) -> int | None:
    """Wait for child `pid`; its wait status, or None if `requests` hit EOF first (parent died).

    The parent sends nothing while a case runs, so `requests` becoming readable means EOF.
    """
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        readable, _, _ = select.select([requests], [], [], 0.5)
        if readable:
            return None


def serve(requests=None, responses=None) -> int:
    """Fork server: for each request line {"entry", "payload", "result"} fork one case process.

    This process only imported torch + mgtq (no parallel op ran, so forking is safe); each forked
    child gets its own address space, so its peak RSS is its own, without paying the imports
    again. The child writes its outcome to the "result" path; the server answers each request
    with one line {"exit": exit code} once the child is gone (a negative code = killed by that
    signal, e.g. -9 by the OOM killer).
    """
    requests = requests or sys.stdin
    responses = responses or sys.stdout
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the case process
            code = 1
            try:
                os.dup2(2, 1)  # library prints must not reach the protocol stream
                run_to_file(request["entry"], request["payload"], request["result"])
                code = 0
            finally:
                os._exit(code)
        status = _wait_or_orphaned(pid, requests)
        if status is None:  # the parent is gone (its end of our stdin closed): stop its case, then us
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            return 1
        responses.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        responses.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["serve"]:
        return serve()
    if len(argv) == 2 and argv[0] == "hold":
        responses = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # library prints must not reach the protocol stream
        return hold(json.loads(Path(argv[1]).read_text()), sys.stdin, responses)
    if len(argv) != 3 or argv[0] not in ENTRY_POINTS:
        print(f"usage: python -m mgtq.bench.child {{{','.join(ENTRY_POINTS)}}} PAYLOAD.json RESULT.json\n"
              "       python -m mgtq.bench.child serve        (fork server, used by mgtq bench)", file=sys.stderr)
        return 2
    run_to_file(argv[0], json.loads(Path(argv[1]).read_text()), argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
