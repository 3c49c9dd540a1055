"""The `mgtq bench` report: the JSON document a run returns, rendered as Markdown tables.

JSON (bytes and seconds everywhere; ratios are plain numbers):

    schema        "mgtq-bench/2"
    created       ISO-8601 UTC time; wall_s: seconds the whole run took
    machine       cpu_count, cpu_model, isa [flags], cpu_class (mgtq's kernel class), torch_threads,
                  torch_version, mgtq_version, mgtq_commit (a checkout's, +dirty; None from a wheel),
                  torchao_version, optimum_quanto_version, python, platform,
                  device, cuda_device, isolation (how cases were separated), memory_total_bytes,
                  loadavg_start / loadavg_end [1, 5, 15 min], timing (interleaved or sequential),
                  loadavg_rounds [[1, 5, 15 min] at each interleaved round's start]
    model         the ModelSource (name, kind, preset, path, resolution, vq_factor, text_length, …,
                  notes) + transformer_params, linear_layers, token_grid [h, w],
                  transformer_tokens, text_tokens
    settings      the BenchConfig (formats, tome, offload, peers, measure{…}, threads, isolation, …)
    configs       [{label, target, tome, tome_blocks, offload}] in run order
    baseline      {unit: "bytes", rss, peak_rss, imports, [fresh_interpreter_rss: only in reports of the
                  former fork-server isolation]}: a case process that only imported torch + mgtq (null when
                  memory was not measured)
    calibration   {seconds, layers} of the shared static-scale pass (mgtq.bench.build.scales_from_random_inputs),
                  or null
    results       one `mgtq.bench.result.CaseResult` per config
    ratios        {label: {weights_vs_bf16, peak_rss_vs_bf16, forward_vs_bf16, forward_cpu_vs_bf16,
                           per_step_vs_bf16, image_vs_bf16, [forward_speedup_vs_no_tome,
                           forward_cpu_speedup_vs_no_tome], [peak_rss_vs_no_offload],
                           [forward_speedup_vs_eager], [<forward ratio>_spread {min, max, rounds}]}}
                  (latency ratios: this / bf16, so < 1 is faster; speedup: no-tome / this). With
                  interleaved rounds a forward ratio is the median of the per-round ratios and its
                  `_spread` gives their min–max and count; otherwise the ratio of the medians.
    skipped       [message] of skipped configs

The project's goals for these numbers are not library code: `python benchmarks/bench_goals.py JSON`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from mgtq.bench.config import EXTRAPOLATE_STEPS
from mgtq.bench.latency import round_ratios
from mgtq.bench.result import CaseResult, mb_text, message_line

SCHEMA_VERSION = "mgtq-bench/2"
TOP_LEVEL_KEYS = ("schema", "created", "wall_s", "machine", "model", "settings", "configs", "baseline",
                  "calibration", "results", "ratios", "skipped")
MACHINE_KEYS = ("cpu_count", "torch_threads", "torch_version", "device", "isolation", "loadavg_start")


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def results_of(report: dict) -> list[CaseResult]:
    return [CaseResult.from_dict(r) for r in report["results"]]


def _forward_ratio(entry: dict, name: str, a: CaseResult, b: CaseResult, cpu: bool = False) -> None:
    """entry[name] = a's forward / b's: the median of per-round ratios when both were timed in the same
    interleaved rounds (with entry[name + "_spread"]), else the ratio of the medians."""
    per_round = round_ratios(a.forward or {}, b.forward or {}, "cpu_samples" if cpu else "samples")
    if per_round:
        entry[name] = statistics.median(per_round)
        entry[name + "_spread"] = {"min": min(per_round), "max": max(per_round), "rounds": len(per_round)}
    elif cpu:
        entry[name] = _ratio(a.forward_cpu_median, b.forward_cpu_median)
    else:
        entry[name] = _ratio(a.forward_median, b.forward_median)


def gpu_peak(result: CaseResult) -> int | None:
    """The case's GPU memory peak (torch's max_memory_allocated over build and inference); None off CUDA."""
    peaks = [(result.memory or {}).get(phase, {}).get("max_memory_allocated") for phase in ("cuda_build",
                                                                                             "cuda_inference")]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def compute_ratios(results: list[CaseResult]) -> dict[str, dict]:
    """Per label: ratios against the "bf16" result of the same run (and tome/offload comparisons).

    Compiled cases compare with compiled bf16 ("bf16+compile"), and with their own eager case.
    """
    ok = {r.label: r for r in results if r.ok}
    ratios = {}
    for label, r in ok.items():
        ref = ok.get("bf16+compile" if r.compile else "bf16")
        entry = {}
        if ref is not None:
            entry = {
                "weights_vs_bf16": _ratio(r.weight_bytes, ref.weight_bytes),
                "peak_rss_vs_bf16": _ratio(r.peak_rss, ref.peak_rss),
                "gpu_peak_vs_bf16": _ratio(gpu_peak(r), gpu_peak(ref)),
                "per_step_vs_bf16": _ratio(r.per_step, ref.per_step),
                "image_vs_bf16": _ratio(r.image_total, ref.image_total),
            }
            _forward_ratio(entry, "forward_vs_bf16", r, ref)
            _forward_ratio(entry, "forward_cpu_vs_bf16", r, ref, cpu=True)
        base = ok.get(r.target)
        if r.tome and base is not None:
            _forward_ratio(entry, "forward_speedup_vs_no_tome", base, r)
            _forward_ratio(entry, "forward_cpu_speedup_vs_no_tome", base, r, cpu=True)
        if r.offload and base is not None:
            entry["peak_rss_vs_no_offload"] = _ratio(r.peak_rss, base.peak_rss)
        if r.compile and base is not None:
            _forward_ratio(entry, "forward_speedup_vs_eager", base, r)
        ratios[label] = entry
    return ratios


def assemble(*, machine: dict, model: dict, settings: dict, cases: list, results: list[CaseResult],
             baseline: dict | None, calibration: dict | None, created: str, wall_s: float) -> dict:
    """The report dict (SCHEMA_VERSION)."""
    return {
        "schema": SCHEMA_VERSION, "created": created, "wall_s": wall_s, "machine": machine, "model": model,
        "settings": settings, "configs": [{"label": c.label, **c.to_dict()} for c in cases], "baseline": baseline,
        "calibration": calibration, "results": [r.to_dict() for r in results],
        "ratios": compute_ratios(results), "skipped": [r.message for r in results if not r.ok],
    }


def validate_report(report: dict) -> None:
    """Raise ValueError naming the first key that does not follow the schema."""
    if report.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema is {report.get('schema')!r}, expected {SCHEMA_VERSION!r}")
    for key in TOP_LEVEL_KEYS:
        if key not in report:
            raise ValueError(f"report lacks top-level key {key!r}")
    for key in MACHINE_KEYS:
        if key not in report["machine"]:
            raise ValueError(f"report.machine lacks {key!r}")
    if len(report["results"]) != len(report["configs"]):
        raise ValueError("report has a different number of results and configs")
    for r in results_of(report):
        if r.ok and (r.weights is None or r.memory is None or r.latency is None):
            raise ValueError(f"result {r.label!r} is ok but lacks weights, memory or latency")


# ------------------------------------------------------------------------------------ markdown
def _fmt(x, digits: int = 2, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def _ratio_text(ratios: dict, name: str) -> str:
    """"0.85 [0.80–0.91]" for a per-round median with its spread, "0.85" otherwise."""
    spread = ratios.get(name + "_spread")
    text = _fmt(ratios.get(name))
    return text if not spread else f"{text} [{spread['min']:.2f}–{spread['max']:.2f}]"


def _timing(t: dict | None) -> str:
    if not t:
        return "–"
    return f"{t['median']:.3g} [{t['min']:.3g}–{t['max']:.3g}] ×{len(t['samples'])}"


def to_markdown(report: dict) -> str:
    """Human-readable tables: results with ratios vs bf16, profiles, skipped peers (the goals: benchmarks/
    bench_goals.py)."""
    m, model, s = report["machine"], report["model"], report["settings"]
    measure = s["measure"]
    lines = [
        f"# mgtq bench — {model['name']}",
        "",
        f"{model['transformer_params'] / 1e9:.3g}B-parameter transformer ({model['linear_layers']} Linears), "
        f"{model['resolution']}×{model['resolution']} px, token grid "
        f"{model['token_grid'][0]}×{model['token_grid'][1]} → {model['transformer_tokens']} transformer tokens + "
        f"{model['text_tokens']} text tokens, CFG batch {_first_batch(report)}.",
        f"Machine: {m['cpu_count']} CPUs ({m.get('cpu_model') or 'unknown CPU'}; {', '.join(m.get('isa') or [])}; "
        f"kernel class {m.get('cpu_class') or '–'}), "
        f"{m['torch_threads']} torch threads, torch {m['torch_version']}"
        + (f", mgtq at {m['mgtq_commit']}" if m.get("mgtq_commit") else "") + f", device {m['device']}; load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end')} at end"
        + (f", 1-min load at each round's start {[round(x[0], 2) for x in m['loadavg_rounds'] if x]}"
           if m.get("loadavg_rounds") else "") + f". Isolation: {m['isolation']}.",
        (f"Timing: {m.get('timing', 'sequential')}; {measure['warmup']} warm-up + up to {measure['repeats']} timed "
         f"forwards per config (median [min–max] ×samples); ×bf16 of forwards timed in interleaved rounds: median "
         f"of the per-round ratios [min–max], else the ratio of the medians; whole image = text encoding + "
         f"{measure['steps']} sampler steps + VQ decode, {EXTRAPOLATE_STEPS}-step image extrapolated as text + "
         f"{EXTRAPOLATE_STEPS} × per-step + decode. " if measure.get("latency", True)
         else "Timing: none (a memory-only run). ")
        + f"Created {report['created']}, run took {report['wall_s'] / 60:.1f} min.",
        _sampler_line(measure),
    ]
    if report["baseline"]:
        base = report["baseline"]
        fresh = base.get("fresh_interpreter_rss")
        lines.append(f"Baseline: a case process that only imported torch + mgtq holds {mb_text(base['rss'])} MB RSS"
                     + (f" ({mb_text(fresh)} MB in a fresh interpreter, which has touched more library pages)"
                        if fresh
                        else "") + "; included in every peak below, nothing subtracted.")
    for note in model.get("notes", []):
        lines.append(f"- {note}")
    results = results_of(report)
    on_gpu = any(gpu_peak(r) is not None for r in results if r.ok)
    lines += ["", "## Results (ratios vs bf16 of the same run; latency ratio < 1 = faster)", "",
              "Peak RSS: whole case process (build + inference). Inference peak: after the build, freed heap "
              "returned to the OS (malloc_trim) and the peak reset; what the built pipeline needs to run."
              + (" GPU peak: torch.cuda.max_memory_allocated over build and inference, the tensors' peak: a lower "
                 "bound of what the GPU must hold (the CUDA context, kernels' modules and the allocator's reserve, "
                 "max_memory_reserved in the JSON, come on top); "
                 "×bf16 CPU time there is mostly the host waiting for the GPU." if on_gpu else ""), "",
              "| config | weights MB | ×bf16 | peak RSS MB | ×bf16 | inference peak RSS MB |"
              + (" GPU peak MB | ×bf16 |" if on_gpu else "")
              + " forward s | ×bf16 | ×bf16 CPU time | per step s | image s | "
              f"{EXTRAPOLATE_STEPS}-step image s (extrap.) "
              "| image NFE (local) |",
              "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if on_gpu else "")
              + "---|---:|---:|---:|---:|---:|---:|"]
    ratios = report["ratios"]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.label} | {r.status} |" + " |" * (13 if on_gpu else 11))
            continue
        q = ratios.get(r.label, {})
        image = r.image or {}
        forward = _timing(r.forward)
        if r.tome and q.get("forward_speedup_vs_no_tome"):
            forward += f" ({q['forward_speedup_vs_no_tome']:.2f}× faster than no merging"
            if q.get("forward_cpu_speedup_vs_no_tome"):
                forward += f"; CPU time {q['forward_cpu_speedup_vs_no_tome']:.2f}×"
            forward += ")"
        if r.compile and q.get("forward_speedup_vs_eager"):
            forward += f" ({_ratio_text(q, 'forward_speedup_vs_eager')}× faster than eager; ×bf16 vs compiled bf16)"
        peak = mb_text(r.peak_rss)
        if r.offload and q.get("peak_rss_vs_no_offload"):
            peak += f" ({q['peak_rss_vs_no_offload']:.2f}× normal)"
        lines.append(
            f"| {r.label} | {mb_text(r.weight_bytes)} | {_fmt(q.get('weights_vs_bf16'), 3)} | {peak} | "
            f"{_fmt(q.get('peak_rss_vs_bf16'))} | {mb_text(r.memory.get('peak_rss_inference'))} | "
            + (f"{mb_text(gpu_peak(r))} | {_fmt(q.get('gpu_peak_vs_bf16'))} | " if on_gpu else "") + f"{forward} | "
            f"{_ratio_text(q, 'forward_vs_bf16')} | {_ratio_text(q, 'forward_cpu_vs_bf16')} | "
            f"{_fmt(image.get('per_step_s'), 3)} | "
            f"{_fmt(image.get('total_s'), 2)} | {_fmt(image.get('extrapolated_total_s'), 1)} | {_nfe(image)} |")
    lines += ["", "Schemes:", ""]
    lines += [f"- **{r.label}**: {r.scheme}" for r in results if r.ok and not r.tome and not r.offload]
    profiled = [r for r in results if r.ok and r.profile]
    if profiled:
        categories = list(profiled[0].profile["split_fraction"])  # benchmarks/bench_profile.py's, in order
        lines += ["", "## Where a forward's time goes (torch.profiler self time, fraction)", "",
                  "| config | total s | " + " | ".join(categories) + " |", "|---|---:|" + "---:|" * len(categories)]
        for r in profiled:
            p = r.profile
            lines.append(f"| {r.label} | {p['total_self_s']:.2f} | " +
                         " | ".join(f"{p['split_fraction'][c]:.2f}" for c in categories) + " |")
    lines += _offload_lines(report)
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {message_line(msg)}" for msg in report["skipped"]]
    notes = sorted({n for r in results for n in r.notes})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _sampler_line(measure: dict) -> str:
    """What the whole image ran: the sampler preset and context reuse; forwards are plain either way."""
    reuse = measure.get("reuse")
    preset = measure.get("sampler")
    sampler = f"sampler preset `{preset}` on the model's settings" if preset else "the model's sampler settings"
    if reuse is not None:
        sampler += (f", context reuse interval {reuse['interval']}, group {reuse['group']}, warmup {reuse['warmup']}"
                    + (f", refresh {reuse['refresh']:g}" if reuse.get("refresh") else ""))
    return (f"Whole image: {sampler}; image NFE = transformer calls (a CFG call counts once), (local) = how many "
            "were local steps of context reuse. Forwards are full forwards (every token, no reuse cache; merged where TomeMGT is on).")


def _nfe(image: dict) -> str:
    if image.get("nfe") is None:
        return "–"
    return f"{image['nfe']} ({image.get('local_nfe', 0)})"


def _offload_lines(report: dict) -> list[str]:
    ok = {r.label: r for r in results_of(report) if r.ok}
    offloads = [r for r in ok.values() if r.offload]
    if not offloads:
        return []
    lines = ["", "## CPU offloading: peak RSS per phase (MB)", "",
             "Offload mode: the transformer produces all tokens, is freed (del + gc), then the VQ decoder is "
             "loaded and decodes. A phase's peak is measured alone (peak reset at its start).", "",
             "| format | normal: sampling | normal: decode | offload: sampling | offload: decode (incl. VQ load) "
             "| transformer freed before decode |", "|---|---:|---:|---:|---:|---|"]
    for r in offloads:
        normal = ok[r.target].memory if r.target in ok else {}
        n, o = normal.get("phase_peaks") or {}, r.memory.get("phase_peaks") or {}
        cells = [mb_text(n.get("sampling")), mb_text(n.get("decode")), mb_text(o.get("sampling")),
                 mb_text(o.get("decode")), str(r.transformer_freed_before_decode)]
        lines.append(f"| {r.target} | " + " | ".join(cells) + " |")
    return lines


def _first_batch(report: dict) -> str:
    for r in results_of(report):
        if r.ok and r.latency:
            return str(r.latency["forward_batch"])
    return "2"


def write_outputs(report: dict, paths: dict[str, Path]) -> None:
    """Write the JSON and the Markdown (each atomically: a reader never sees half a file)."""
    import json

    from mgtq.files import atomic_write_text

    validate_report(report)
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")  # in run order, unlike write_json
    atomic_write_text(paths["md"], to_markdown(report))
