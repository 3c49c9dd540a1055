"""One benchmark case: built and warmed up once, its forwards timed on request, then one whole image.

    python -m mgtq.bench.case PAYLOAD.json      # the case process the runner starts (spawn isolation)

The process reads its payload (`make_payload`), answers on stdout in JSON lines and takes requests on
stdin: for entry "case" it answers {"timed": bool} once built, then {"op": "time", "n", "round",
"budget_s"} with {"samples": [s]} and {"op": "finish"} with {"ok": CaseResult dict}; the entries
"scales" (static int8 scales for the W4A8/SCQ cases) and "baseline" (memory of a process that only
imported torch + mgtq) answer {"ok": result} at once. A failure answers {"error": traceback}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
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
from mgtq.bench.formats import Format
from mgtq.bench.latency import CallTimer, Timing, time_call, time_repeated
from mgtq.bench.result import CaseResult
from mgtq.bench.source import BENCH_PROMPT, ModelSource, forward_inputs
from mgtq.compilation import toolchain_failure

_TOME_NOTES = {
    "joint": "TomeMGT on the 14 joint (MMDiT) blocks only: the paper's setting",
    "single": "TomeMGT on the single-stream blocks only (an ablation; the paper reports it failed on quality)",
    "all": "TomeMGT on joint and single-stream blocks (an ablation; the paper merges joint blocks only)",
}


def make_payload(entry: str, source: ModelSource, case: BenchCase | None, measure: MeasureSettings, threads: int,
                 device: str = "cpu", seed: int = 0, input_scales: dict[str, float] | None = None) -> dict:
    """The JSON-able description of one run of `entry` ("case", "scales" or "baseline")."""
    return {"entry": entry, "source": source.to_dict(), "case": None if case is None else case.to_dict(),
            "measure": measure.to_dict(), "threads": threads, "device": device, "seed": seed,
            "input_scales": input_scales}


# -------------------------------------------------------------------------------------- images
def timed_image(pipe, steps: int, sync: Callable[[], None] = lambda: None, phases: memory.PhasePeaks | None = None,
                warm_decode: bool = True, load_vq: Callable[[], torch.nn.Module] | None = None
                ) -> tuple[dict, bool, list]:
    """One whole image: text encoding, `steps` sampler steps, VQ decode; (seconds, transformer freed, images).

    With `load_vq` (the paper's CPU-offloading mode) `pipe.vqvae` is a placeholder: the transformer makes
    all tokens, is dropped and garbage-collected (the caller must hold no other reference), and only then
    is the VQ loaded. With `phases`, the peak RSS of "sampling" and "decode" is recorded there.
    """
    phases = phases or memory.PhasePeaks()
    vq_load_s, freed = None, False
    with torch.inference_mode():
        text_s, _ = time_call(lambda: (pipe.encode_prompt([BENCH_PROMPT]), pipe.encode_prompt([""])), sync)
        timer = CallTimer(pipe.transformer, sync)
        with timer, phases.phase("sampling"):
            tokens_s, out = time_call(lambda: pipe(BENCH_PROMPT, num_inference_steps=steps, seed=0,
                                                   output_type="latent", progress=False), sync)
        calls = (timer.durations, timer.cpu_durations)
        del timer
        if load_vq is not None:
            alive = weakref.ref(pipe.transformer)
            pipe.transformer = None
            gc.collect()
            freed = alive() is None
        with phases.phase("decode"):
            if load_vq is not None:
                vq_load_s, pipe.vqvae = time_call(load_vq, sync)
            elif warm_decode:
                pipe.decode_tokens(out.tokens)
            decode_s, images = time_call(lambda: pipe.decode_tokens(out.tokens), sync)
    per_step = max(tokens_s - text_s, 0.0) / steps
    extra = decode_s + (vq_load_s or 0.0)
    reuse = pipe.settings.sampler.reuse
    # With context reuse full and local steps differ in cost and their mix depends on the step count,
    # so a run of other length says nothing exact about a 48-step image: only a 48-step run does.
    extrapolated = (text_s + EXTRAPOLATE_STEPS * per_step + extra) if not reuse.enabled or steps == EXTRAPOLATE_STEPS \
        else None
    record = {"unit": "s", "steps": steps, "nfe": out.nfe, "local_nfe": out.local_nfe, "token_nfe": out.token_nfe,
              "reuse": dataclasses.asdict(reuse), "text_s": text_s, "tokens_s": tokens_s,
              "per_step_s": per_step, "decode_s": decode_s, "vq_load_s": vq_load_s, "total_s": tokens_s + extra,
              "transformer_calls_s": list(calls[0]), "transformer_calls_cpu_s": list(calls[1]),
              "extrapolated_steps": EXTRAPOLATE_STEPS, "extrapolated_total_s": extrapolated}
    return record, freed, images


# ------------------------------------------------------------------------------------ the case
class CaseSession:
    """One case, built and warmed up once, then timed on request (`time_forwards`), then `finish`-ed.

    A peer that is unavailable or fails is reported as skipped (`ready` False); a format that fails raises.
    """

    def __init__(self, payload: dict):
        torch.set_num_threads(int(payload["threads"]))
        self._wall = time.perf_counter()
        self._payload = payload
        self.source = ModelSource.from_dict(payload["source"])
        self.case = BenchCase.from_dict(payload["case"])
        self.measure = MeasureSettings.from_dict(payload["measure"])
        self.device = torch.device(payload["device"])
        self.sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        # Interleaved cases are processes sharing one GPU: each hands the activation memory its allocator keeps
        # back after its turn, or a 16–24 GB card runs out with every case's cache resident at once.
        self.release = torch.cuda.empty_cache if self.device.type == "cuda" else (lambda: None)
        self.peer = _peer(self.case.target) if self.case.is_peer else None
        self.result = CaseResult.of(self.case, family=self.peer.family if self.peer else "mgtq")
        self.result.loadavg = {"before": memory.loadavg(), "after": None}
        self.samples, self.cpu_samples, self.rounds = [], [], []
        self.ready = False
        self._phase = contextlib.ExitStack()
        if self.peer:
            reason = _peer_lab().unavailable_reason(self.case.target, self.device.type)
            if reason is not None:
                self.result.status, self.result.message = "skipped", reason
                return
        try:
            self._build_and_warm_up()
        except Exception as err:  # a failing peer is reported, the run goes on
            if not self.peer:
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
        text = str(err).strip()
        self.result.status = "skipped"
        self.result.message = (f"{self.case.target} skipped: {self.peer.scheme} failed on {self.device.type} "
                               f"({type(err).__name__}: {text.splitlines()[0][:200] if text else ''})")

    def _build_and_warm_up(self) -> None:
        from mgtq.bench.build import build_pipeline, build_transformer

        case, measure, device, result = self.case, self.measure, self.device, self.result
        seed = int(self._payload["seed"])
        dtype = torch.float32 if case.target == "fp32" else torch.bfloat16  # a peer starts from bf16
        self.inputs = forward_inputs(self.source, dtype, str(device), seed=seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        if self.peer:  # the peer quantizes the bf16 model in place (its own way there: its build peak includes bf16)
            transformer, notes = build_transformer(self.source, "bf16", None, seed, str(device))
            with torch.inference_mode():
                self.peer.apply(transformer, lambda: transformer(**self.inputs))
            notes.append(f"{case.target}: quantized in place from the bf16 model, so its build peak (peak_rss_build) "
                         "includes the bf16 weights; its inference peak is measured after that")
            result.quantize_s, result.scheme = time.perf_counter() - start, f"{self.peer.family}: {self.peer.scheme}"
        else:
            transformer, notes = build_transformer(self.source, case.target, self._payload["input_scales"], seed,
                                                   str(device))
            result.scheme = Format.parse(case.target).scheme
        self.pipe = build_pipeline(self.source, transformer.eval(), dtype, measure.steps, seed, str(device),
                                   vq_empty=case.offload)
        self.pipe.settings = dataclasses.replace(self.pipe.settings,
                                                 sampler=measure.image_sampler(self.pipe.settings.sampler))
        if case.tome:
            from mgtq.merging import apply_tomemgt

            apply_tomemgt(self.pipe, ratio=case.tome, blocks=case.tome_blocks, **case.tome_options)
            notes.append(_TOME_NOTES[case.tome_blocks])
        if case.compile:
            # in place, per block: compiled by the warm-up forward; a peer's blocks are not kept in mgtq's
            # precompiled store (its tensor subclasses are the library's to serialize), so it compiles every run
            self.pipe.compile(persistent_cache=not self.peer)
            notes.append("+compile: every transformer block under torch.compile(fullgraph=True) "
                         "(MGTPipeline.compile); compile time in the untimed warm-up")
        result.build_s, result.notes = time.perf_counter() - start, notes
        result.weights = _weights_record(transformer)
        del transformer  # from here on only the pipeline holds it (offload mode must be able to free it)
        self.mem = _memory_after_build(device)
        self.phases = memory.PhasePeaks()
        self.mem["peak_reset_supported"] = self.phases.supported
        self._phase.enter_context(self.phases.phase("forwards"))
        # Untimed warm-up (offload mode too, so its steps compare; it also puts a forward in the peak). A compiled
        # case always warms up: its first forward compiles, which --warmup 0 put into the first timed round.
        warm_up = measure.warmup if measure.latency and not (case.offload or case.compile) else max(1, measure.warmup)
        self.warmup_s = [time_call(self._forward, self.sync)[0] for _ in range(warm_up)]  # the first compiles
        if case.compile and toolchain_failure() is not None:  # the blocks fell back to eager: not what was asked
            raise RuntimeError(f"--compile: torch.compile cannot build code on this machine ({toolchain_failure()}), "
                               "so this case would time eager code; run without --compile, or install what "
                               "compiling needs (see the warning above)")

    def _forward(self):
        with torch.inference_mode():
            return self.pipe.transformer(**self.inputs)

    def time_forwards(self, n: int, round_index: int | None = None, budget_s: float | None = None) -> list[float]:
        """Time up to `n` forwards (fewer once `budget_s` seconds were spent on this case); their wall seconds."""
        if not self.timed:
            return []
        if budget_s is not None:
            budget_s -= sum(self.samples)
            if budget_s <= 0 and self.samples:
                return []
        timing = time_repeated(self._forward, n, budget_s, self.sync)
        self.release()
        self.samples += timing.samples
        self.cpu_samples += timing.cpu_samples
        # round indices only for interleaved rounds: a sequential run's ratio is that of its medians (round_ratios
        # would pair its samples as if they had been taken side by side)
        if round_index is None or self.rounds is None:
            self.rounds = None
        else:
            self.rounds += [round_index] * len(timing.samples)
        return list(timing.samples)

    def finish(self) -> dict:
        """The whole image run, memory peaks, the profile; the CaseResult as a dict."""
        if self.ready:
            self._finish()
        self.result.loadavg["after"] = memory.loadavg()
        self.result.wall_s = time.perf_counter() - self._wall
        return self.result.to_dict()

    def _finish(self) -> None:
        from mgtq.bench.build import build_vq

        case, device, result, phases = self.case, self.device, self.result, self.phases
        self._phase.close()  # the "forwards" phase ends
        latency = {"unit": "s", "forward_batch": int(self.inputs["hidden_states"].shape[0]), "forward": None,
                   "warmup_s": self.warmup_s}
        if self.samples:
            latency["forward"] = Timing.of(self.samples, self.cpu_samples, self.rounds).to_dict()
        try:
            if case.offload:
                pipe, self.pipe = self.pipe, None
                seed = int(self._payload["seed"])
                latency["image"], result.transformer_freed_before_decode, _ = timed_image(
                    pipe, self.measure.steps, self.sync, phases, load_vq=lambda: build_vq(self.source, seed).to(device))
            else:
                latency["image"], _, _ = timed_image(self.pipe, self.measure.steps, self.sync, phases,
                                                     warm_decode=self.measure.warmup > 0)
        except Exception as err:
            if not self.peer:
                raise
            self._skip(err)
            return
        result.latency = latency
        mem = self.mem
        mem["phase_peaks"] = dict(phases.peaks)
        mem["peak_rss_inference"] = phases.overall if phases.supported else None
        mem["peak_rss_process"] = memory.highest(mem["peak_rss_build"], phases.overall)
        if device.type == "cuda":
            mem["cuda_inference"] = memory.cuda_peaks(device)
        result.memory = mem
        if self.measure.profile and not case.offload:  # last: the profiler's own memory must not count above
            from mgtq.bench.lab import load_lab

            result.profile = load_lab("profile").profile_call(self._forward, device=str(device))


def _peer_lab():
    from mgtq.bench.lab import load_lab

    return load_lab("peers")


def _peer(name: str):
    return _peer_lab().PEERS[name]


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


# ------------------------------------------------------------------------- scales, baseline
def scales(payload: dict) -> dict:
    """{"input_scales": {layer: float}, "seconds": s}: one CFG forward of the bf16 model on random inputs."""
    from mgtq.bench.build import scales_from_random_inputs

    torch.set_num_threads(int(payload["threads"]))
    start = time.perf_counter()
    found = scales_from_random_inputs(ModelSource.from_dict(payload["source"]), int(payload["seed"]),
                                      payload["device"])
    return {"input_scales": found, "seconds": time.perf_counter() - start}


def baseline(payload: dict) -> dict:
    """Memory of a case process that only imported torch + mgtq (nothing built)."""
    torch.set_num_threads(int(payload["threads"]))
    return {"unit": "bytes", "rss": memory.current_rss_bytes(), "peak_rss": memory.peak_rss_bytes(),
            "imports": ["torch", "mgtq"]}


ONE_SHOT = {"scales": scales, "baseline": baseline}


def serve(payload: dict, requests, responses) -> int:
    """Run `payload` and answer `requests` (JSON lines) on `responses`; see the module docstring."""
    def answer(message: dict) -> None:
        responses.write(json.dumps(message) + "\n")
        responses.flush()

    try:
        if payload["entry"] in ONE_SHOT:
            answer({"ok": ONE_SHOT[payload["entry"]](payload)})
            return 0
        session = CaseSession(payload)
        answer({"timed": session.timed})
        for line in requests:
            request = json.loads(line)
            if request["op"] == "time":
                answer({"samples": session.time_forwards(request["n"], request["round"], request.get("budget_s"))})
            elif request["op"] == "finish":
                answer({"ok": session.finish()})
                return 0
    except BaseException:  # reported to the runner, which decides what a failure means
        answer({"error": traceback.format_exc()[-3000:]})
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mgtq.bench.case PAYLOAD.json   (started by mgtq bench)", file=sys.stderr)
        return 2
    responses = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints must not reach the protocol stream
    return serve(json.loads(Path(argv[0]).read_text()), sys.stdin, responses)


if __name__ == "__main__":
    sys.exit(main())
