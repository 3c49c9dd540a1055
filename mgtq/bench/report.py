"""The `mgtq bench` report: a JSON document (schema below), a Markdown table and PNG bar charts.

JSON schema "mgtq-bench/1" (bytes and seconds everywhere; ratios are plain numbers):

    schema        "mgtq-bench/1"
    created       ISO-8601 UTC time; wall_s: seconds the whole run took
    machine       cpu_count, cpu_model, isa [flags], torch_threads, torch_version, mgtq_version,
                  torchao_version, optimum_quanto_version, python, platform, device, cuda_device,
                  isolation (how cases were separated), memory_total_bytes,
                  loadavg_start / loadavg_end [1, 5, 15 min]
    model         the ModelSource (name, kind, preset, path, resolution, vq_factor, text_length, …,
                  notes) + transformer_params, linear_layers, token_grid [h, w],
                  transformer_tokens, text_tokens
    settings      the BenchConfig (formats, tome, offload, peers, measure{warmup, repeats, steps,
                  budget_s, profile, latency, memory}, threads, isolation, device, seed, …)
    configs       [{label, target, tome, tome_blocks, offload}] in run order
    baseline      {unit: "bytes", rss, peak_rss, imports, [fresh_interpreter_rss]}: a case process
                  that only imported torch + mgtq (null when memory was not measured); with the
                  fork server also the RSS of a fresh interpreter after the same imports
    calibration   {seconds, layers} of the shared static-scale pass, or null
    results       one per config:
        label, target, kind ("mgtq" | "peer"), family ("mgtq" | "optimum-quanto" | "torchao"),
        scheme, tome, tome_blocks, offload, status ("ok" | "skipped" | "failed"), message, notes [str],
        build_s, quantize_s (peers: quantize + calibrate + freeze), wall_s, loadavg {before, after},
        weights  {unit: "bytes", transformer_bytes, method, storage_bytes, linear_layers {class: n}}
        memory   {unit: "bytes", peak_rss_build, rss_after_build (after gc + returning freed heap to
                  the OS: heap_trimmed_after_build), peak_rss_inference (peak after that, reset),
                  peak_rss_process (whole process: max of the build peak and the phase peaks),
                  peak_reset_supported, phase_peaks {forwards,
                  sampling, decode: peak RSS of that phase alone (offload: decode includes the VQ load)},
                  [cuda_build / cuda_inference {max_memory_reserved, max_memory_allocated}]}
        latency  {unit: "s", forward_batch, forward {median, min, max, samples (wall s),
                  cpu_median, cpu_samples (process CPU s)} | null,
                  image {steps, nfe, text_s, tokens_s, per_step_s, decode_s, vq_load_s, total_s,
                         transformer_calls_s, transformer_calls_cpu_s, extrapolated_steps,
                         extrapolated_total_s}}
        profile  null | {unit: "s", total_self_s, split_s {category: s}, split_fraction, top_ops}
        transformer_freed_before_decode  bool (offload cases) | null
    ratios        {label: {weights_vs_bf16, peak_rss_vs_bf16, forward_vs_bf16, forward_cpu_vs_bf16,
                           per_step_vs_bf16, image_vs_bf16, [forward_speedup_vs_no_tome,
                           forward_cpu_speedup_vs_no_tome], [peak_rss_vs_no_offload]}}
                  (latency ratios: this / bf16, so < 1 is faster; speedup: no-tome / this)
    goals         [{name, description, value, op ("<=" | ">=" | "<"), target, met, miss}]
                  (miss: how far from the target, as a fraction of it; 0 when met)
    skipped       [message] of skipped configs
"""

from __future__ import annotations

from pathlib import Path

SCHEMA_VERSION = "mgtq-bench/1"
TOP_LEVEL_KEYS = ("schema", "created", "wall_s", "machine", "model", "settings", "configs", "baseline",
                  "calibration", "results", "ratios", "goals", "skipped")
RESULT_KEYS = ("label", "target", "kind", "family", "scheme", "tome", "tome_blocks", "offload", "status", "message",
               "notes", "weights", "memory", "latency", "profile", "build_s", "wall_s",
               "transformer_freed_before_decode")
MACHINE_KEYS = ("cpu_count", "torch_threads", "torch_version", "device", "isolation", "loadavg_start")
MB = 1e6


def failed_result(case, message: str) -> dict:
    """The result of a case whose process failed."""
    return {"label": case.label, "target": case.target, "kind": "peer" if case.is_peer else "mgtq",
            "family": None, "scheme": None, "tome": case.tome, "tome_blocks": case.tome_blocks,
            "offload": case.offload, "compile": case.compile, "status": "failed",
            "message": message, "notes": [], "weights": None, "memory": None, "latency": None, "profile": None,
            "build_s": None, "quantize_s": None, "wall_s": None, "loadavg": None,
            "transformer_freed_before_decode": None}


# ---------------------------------------------------------------------------------- accessors
def _ok(results: list[dict]) -> dict[str, dict]:
    return {r["label"]: r for r in results if r["status"] == "ok"}


def weight_bytes(r: dict) -> int | None:
    return (r.get("weights") or {}).get("transformer_bytes")


def peak_rss(r: dict) -> int | None:
    return (r.get("memory") or {}).get("peak_rss_process")


def forward_median(r: dict) -> float | None:
    forward = (r.get("latency") or {}).get("forward")
    return forward["median"] if forward else None


def forward_cpu_median(r: dict) -> float | None:
    forward = (r.get("latency") or {}).get("forward")
    return forward.get("cpu_median") if forward else None


def per_step(r: dict) -> float | None:
    image = (r.get("latency") or {}).get("image")
    return image["per_step_s"] if image else None


def image_total(r: dict) -> float | None:
    image = (r.get("latency") or {}).get("image")
    return image["total_s"] if image else None


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def one_line(r: dict) -> str:
    """A case's headline numbers, for progress logs."""
    if r["status"] != "ok":
        return f"{r['label']}: {r['status']} — {r['message'].splitlines()[0]}"
    parts = [f"weights {_mb(weight_bytes(r))} MB", f"peak RSS {_mb(peak_rss(r))} MB"]
    if forward_median(r) is not None:
        parts.append(f"forward {forward_median(r):.3g} s")
    if per_step(r) is not None:
        parts.append(f"step {per_step(r):.3g} s")
    return f"{r['label']}: " + ", ".join(parts)


# ------------------------------------------------------------------------------- ratios, goals
def compute_ratios(results: list[dict]) -> dict[str, dict]:
    """Per label: ratios against the "bf16" result of the same run (and tome/offload comparisons).

    Compiled cases compare with compiled bf16 ("bf16+compile"), and with their own eager case.
    """
    ok = _ok(results)
    ratios = {}
    for label, r in ok.items():
        compiled = r.get("compile", False)
        ref = ok.get("bf16+compile" if compiled else "bf16")
        entry = {}
        if ref is not None:
            entry = {
                "weights_vs_bf16": _ratio(weight_bytes(r), weight_bytes(ref)),
                "peak_rss_vs_bf16": _ratio(peak_rss(r), peak_rss(ref)),
                "forward_vs_bf16": _ratio(forward_median(r), forward_median(ref)),
                "forward_cpu_vs_bf16": _ratio(forward_cpu_median(r), forward_cpu_median(ref)),
                "per_step_vs_bf16": _ratio(per_step(r), per_step(ref)),
                "image_vs_bf16": _ratio(image_total(r), image_total(ref)),
            }
        if r["tome"] and r["target"] in ok:
            entry["forward_speedup_vs_no_tome"] = _ratio(forward_median(ok[r["target"]]), forward_median(r))
            entry["forward_cpu_speedup_vs_no_tome"] = _ratio(forward_cpu_median(ok[r["target"]]),
                                                             forward_cpu_median(r))
        if compiled and r["target"] in ok:
            entry["forward_speedup_vs_eager"] = _ratio(forward_median(ok[r["target"]]), forward_median(r))
        if r["offload"] and r["target"] in ok:
            entry["peak_rss_vs_no_offload"] = _ratio(peak_rss(r), peak_rss(ok[r["target"]]))
        ratios[label] = entry
    return ratios


def _goal(name: str, description: str, value: float | None, op: str, target: float) -> dict | None:
    if value is None:
        return None
    met = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
    miss = 0.0 if met else abs(value - target) / target
    return {"name": name, "description": description, "value": value, "op": op, "target": target, "met": met,
            "miss": miss}


def compute_goals(results: list[dict], ratios: dict[str, dict]) -> list[dict]:
    """The project's goals that this run has data for (see the `mgtq bench` docs)."""
    from mgtq.bench.peers import W4A8_PEERS

    ok = _ok(results)
    r = lambda label, key: ratios.get(label, {}).get(key)  # noqa: E731
    goals = [
        _goal("scq_weights", "SCQ transformer weights / bf16", r("scq", "weights_vs_bf16"), "<=", 0.28),
        _goal("scq_forward", "SCQ forward latency / bf16", r("scq", "forward_vs_bf16"), "<=", 0.95),
        _goal("w4a8_forward", "W4A8-everywhere forward latency / bf16", r("w4a8", "forward_vs_bf16"), "<=", 0.70),
        _goal("w4a16_forward", "W4A16 forward latency / bf16", r("w4a16", "forward_vs_bf16"), "<=", 1.0),
        # The same goals for the opt-in weight-cache variants (they trade memory for the speed).
        _goal("scq-cached_weights", "scq-cached transformer weights / bf16", r("scq-cached", "weights_vs_bf16"),
              "<=", 0.28),
        _goal("scq-cached_forward", "scq-cached forward latency / bf16", r("scq-cached", "forward_vs_bf16"),
              "<=", 0.95),
        _goal("w4a8-cached_forward", "w4a8-cached forward latency / bf16", r("w4a8-cached", "forward_vs_bf16"),
              "<=", 0.70),
    ]
    if "bf16+compile" in ok:
        goals += [
            _goal("compile_bf16_speedup", "bf16: eager forward / compiled forward", r("bf16+compile",
                  "forward_speedup_vs_eager"), ">=", 1.5),
            _goal("compile_scq_forward", "compiled SCQ forward / compiled bf16", r("scq+compile", "forward_vs_bf16"),
                  "<=", 0.9),
            _goal("compile_w4a8_forward", "compiled W4A8 forward / compiled bf16", r("w4a8+compile",
                  "forward_vs_bf16"), "<=", 0.7),
            _goal("compile_w4a16_forward", "compiled W4A16 forward / compiled bf16", r("w4a16+compile",
                  "forward_vs_bf16"), "<=", 1.0),
        ]
    for label, res in ok.items():
        if res["tome"] == 0.5 and not res["offload"]:
            blocks = res.get("tome_blocks", "joint")
            goals.append(_goal(f"tome_speedup_{label}", f"{res['target']}: forward without merging / with TomeMGT "
                               f"0.5 ({blocks} blocks)", r(label, "forward_speedup_vs_no_tome"), ">=", 1.4))
    mine = ok.get("w4a8")
    for peer in W4A8_PEERS:
        if mine is not None and peer in ok:
            goals.append(_goal(f"w4a8_vs_{peer}_forward", f"mgtq w4a8 forward / {peer} forward",
                               _ratio(forward_median(mine), forward_median(ok[peer])), "<", 1.0))
            goals.append(_goal(f"w4a8_vs_{peer}_weights", f"mgtq w4a8 weight bytes / {peer} weight bytes",
                               _ratio(weight_bytes(mine), weight_bytes(ok[peer])), "<", 1.0))
    return [g for g in goals if g is not None]


def assemble(*, machine: dict, model: dict, settings: dict, cases: list, results: list[dict], baseline: dict | None,
             calibration: dict | None, created: str, wall_s: float) -> dict:
    """The report dict (SCHEMA_VERSION)."""
    ratios = compute_ratios(results)
    return {
        "schema": SCHEMA_VERSION, "created": created, "wall_s": wall_s, "machine": machine, "model": model,
        "settings": settings, "configs": [{"label": c.label, **c.to_dict()} for c in cases], "baseline": baseline,
        "calibration": calibration, "results": results, "ratios": ratios,
        "goals": compute_goals(results, ratios),
        "skipped": [r["message"] for r in results if r["status"] != "ok"],
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
    for res in report["results"]:
        for key in RESULT_KEYS:
            if key not in res:
                raise ValueError(f"result {res.get('label')!r} lacks {key!r}")
        if res["status"] not in ("ok", "skipped", "failed"):
            raise ValueError(f"result {res['label']!r} has status {res['status']!r}")
        if res["status"] == "ok":
            if res["weights"]["unit"] != "bytes" or not isinstance(res["weights"]["transformer_bytes"], int):
                raise ValueError(f"result {res['label']!r}: weights must be integer bytes")
            if res["latency"]["unit"] != "s":
                raise ValueError(f"result {res['label']!r}: latency unit must be seconds")
            if res["memory"]["unit"] != "bytes":
                raise ValueError(f"result {res['label']!r}: memory unit must be bytes")
        elif not res["message"]:
            raise ValueError(f"result {res['label']!r} is {res['status']} without a message")


# ------------------------------------------------------------------------------------ markdown
def _fmt(x, digits: int = 2, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def _mb(x) -> str:
    return "–" if x is None else f"{x / MB:,.0f}"


def _timing(t: dict | None) -> str:
    if not t:
        return "–"
    return f"{t['median']:.3g} [{t['min']:.3g}–{t['max']:.3g}] ×{len(t['samples'])}"


def to_markdown(report: dict) -> str:
    """Human-readable tables: results with ratios vs bf16, goals, profiles, skipped peers."""
    m, model, s = report["machine"], report["model"], report["settings"]
    measure = s["measure"]
    lines = [
        f"# mgtq bench — {model['name']}",
        "",
        f"{model['transformer_params'] / 1e9:.3g}B-parameter transformer ({model['linear_layers']} Linears), "
        f"{model['resolution']}×{model['resolution']} px, token grid "
        f"{model['token_grid'][0]}×{model['token_grid'][1]} → {model['transformer_tokens']} transformer tokens + "
        f"{model['text_tokens']} text tokens, CFG batch {_first_batch(report)}.",
        f"Machine: {m['cpu_count']} CPUs ({m.get('cpu_model') or 'unknown CPU'}; {', '.join(m.get('isa') or [])}), "
        f"{m['torch_threads']} torch threads, torch {m['torch_version']}, device {m['device']}; load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end')} at end. Isolation: {m['isolation']}.",
        f"Timing: {measure['warmup']} warm-up + up to {measure['repeats']} timed forwards per config "
        f"(median [min–max] ×samples); whole image = text encoding + {measure['steps']} sampler steps + VQ decode, "
        f"48-step image extrapolated as text + 48 × per-step + decode. Created {report['created']}, run took "
        f"{report['wall_s'] / 60:.1f} min.",
    ]
    if report["baseline"]:
        base = report["baseline"]
        fresh = base.get("fresh_interpreter_rss")
        lines.append(f"Baseline: a case process that only imported torch + mgtq holds {_mb(base['rss'])} MB RSS"
                     + (f" ({_mb(fresh)} MB in a fresh interpreter, which has touched more library pages)" if fresh
                        else "") + "; included in every peak below, nothing subtracted.")
    for note in model.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "## Results (ratios vs bf16 of the same run; latency ratio < 1 = faster)", "",
              "Peak RSS: whole case process (build + inference). Inference peak: after the build, freed heap "
              "returned to the OS (malloc_trim) and the peak reset; what the built pipeline needs to run.", "",
              "| config | weights MB | ×bf16 | peak RSS MB | ×bf16 | inference peak RSS MB | forward s | ×bf16 "
              "| ×bf16 CPU time | per step s | image s | 48-step image s (extrap.) |",
              "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    ratios = report["ratios"]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | | | | | | | | |")
            continue
        q = ratios.get(r["label"], {})
        image = (r["latency"] or {}).get("image") or {}
        forward = _timing(r["latency"].get("forward"))
        if r["tome"] and q.get("forward_speedup_vs_no_tome"):
            forward += f" ({q['forward_speedup_vs_no_tome']:.2f}× faster than no merging"
            if q.get("forward_cpu_speedup_vs_no_tome"):
                forward += f"; CPU time {q['forward_cpu_speedup_vs_no_tome']:.2f}×"
            forward += ")"
        if q.get("forward_speedup_vs_eager"):
            forward += f" ({q['forward_speedup_vs_eager']:.2f}× faster than eager; ×bf16 vs compiled bf16)"
        peak = _mb(peak_rss(r))
        if r["offload"] and q.get("peak_rss_vs_no_offload"):
            peak += f" ({q['peak_rss_vs_no_offload']:.2f}× normal)"
        lines.append(
            f"| {r['label']} | {_mb(weight_bytes(r))} | {_fmt(q.get('weights_vs_bf16'), 3)} | {peak} | "
            f"{_fmt(q.get('peak_rss_vs_bf16'))} | {_mb(r['memory'].get('peak_rss_inference'))} | {forward} | "
            f"{_fmt(q.get('forward_vs_bf16'))} | {_fmt(q.get('forward_cpu_vs_bf16'))} | "
            f"{_fmt(image.get('per_step_s'), 3)} | "
            f"{_fmt(image.get('total_s'), 2)} | {_fmt(image.get('extrapolated_total_s'), 1)} |")
    lines += ["", "Schemes:", ""]
    lines += [f"- **{r['label']}**: {r['scheme']}" for r in report["results"] if r["status"] == "ok" and not r["tome"]
              and not r["offload"]]
    if report["goals"]:
        lines += ["", "## Goals (set for meissonic-1024; on other models for information)", "",
                  "| goal | value | target | met |", "|---|---:|---:|---|"]
        for g in report["goals"]:
            verdict = "yes" if g["met"] else f"**no** (off by {100 * g['miss']:.0f}%)"
            lines.append(f"| {g['description']} | {g['value']:.3f} | {g['op']} {g['target']:g} | {verdict} |")
    profiled = [r for r in report["results"] if r["status"] == "ok" and r.get("profile")]
    if profiled:
        from mgtq.bench.profile import CATEGORIES

        lines += ["", "## Where a forward's time goes (torch.profiler self time, fraction)", "",
                  "| config | total s | " + " | ".join(CATEGORIES) + " |", "|---|---:|" + "---:|" * len(CATEGORIES)]
        for r in profiled:
            p = r["profile"]
            lines.append(f"| {r['label']} | {p['total_self_s']:.2f} | " +
                         " | ".join(f"{p['split_fraction'][c]:.2f}" for c in CATEGORIES) + " |")
    lines += _offload_lines(report)
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {msg.splitlines()[0]}" for msg in report["skipped"]]
    notes = sorted({n for r in report["results"] for n in r.get("notes", [])})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _offload_lines(report: dict) -> list[str]:
    ok = _ok(report["results"])
    offloads = [r for r in ok.values() if r["offload"]]
    if not offloads:
        return []
    lines = ["", "## CPU offloading: peak RSS per phase (MB)", "",
             "Offload mode: the transformer produces all tokens, is freed (del + gc), then the VQ decoder is "
             "loaded and decodes. A phase's peak is measured alone (peak reset at its start).", "",
             "| format | normal: sampling | normal: decode | offload: sampling | offload: decode (incl. VQ load) "
             "| transformer freed before decode |", "|---|---:|---:|---:|---:|---|"]
    for r in offloads:
        normal = (ok.get(r["target"]) or {}).get("memory") or {}
        n, o = normal.get("phase_peaks") or {}, r["memory"].get("phase_peaks") or {}
        lines.append(f"| {r['target']} | {_mb(n.get('sampling'))} | {_mb(n.get('decode'))} | {_mb(o.get('sampling'))} "
                     f"| {_mb(o.get('decode'))} | {r['transformer_freed_before_decode']} |")
    return lines


def _first_batch(report: dict) -> str:
    for r in report["results"]:
        if r["status"] == "ok" and r["latency"]:
            return str(r["latency"]["forward_batch"])
    return "2"


# ----------------------------------------------------------------------------------------- PNG
_COLORS = {"mgtq": "#1f77b4", "optimum-quanto": "#ff7f0e", "torchao": "#2ca02c"}


def plot_png(report: dict, path: Path) -> None:
    """Three horizontal bar charts: weight MB, peak RSS MB, forward median s (min–max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    labels = [r["label"] for r in ok]
    colors = [_COLORS.get(r["family"], "#7f7f7f") for r in ok]
    panels = [("transformer weights (MB)", [(weight_bytes(r) or 0) / MB for r in ok], None),
              ("peak RSS, whole process (MB)", [(peak_rss(r) or 0) / MB for r in ok], None)]
    medians = [forward_median(r) or 0.0 for r in ok]
    errors = [[m - (r["latency"]["forward"] or {}).get("min", m) for m, r in zip(medians, ok)],
              [(r["latency"]["forward"] or {}).get("max", m) - m for m, r in zip(medians, ok)]]
    panels.append(("transformer forward, CFG batch 2 (s, median)", medians, errors))
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.42 * len(ok) + 1.8), sharey=True)
    ys = list(range(len(ok)))
    for ax, (title, values, err) in zip(axes, panels):
        ax.barh(ys, values, color=colors, xerr=err, capsize=2)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ref = dict(zip(labels, values)).get("bf16")
        for y, v in zip(ys, values):
            if ref and v:
                ax.text(v, y, f" {v / ref:.2f}×", va="center", fontsize=7)
    axes[0].set_yticks(ys, labels, fontsize=8)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    fig.legend(handles, list(_COLORS), loc="lower center", ncol=3, fontsize=8, frameon=False)
    threads = report["machine"]["torch_threads"]
    fig.suptitle(f"mgtq bench — {report['model']['name']} ({threads} thread{'s' if threads != 1 else ''}, "
                 f"{report['machine']['device']}, load avg {report['machine']['loadavg_start']}); ratios vs bf16",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, paths: dict[str, Path]) -> None:
    """Write JSON, Markdown and PNG (each atomically: a reader never sees half a file)."""
    import json

    from mgtq.utils import atomic_write_text

    validate_report(report)
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["md"], to_markdown(report))
    tmp = paths["png"].with_name(f".{paths['png'].stem}.tmp.png")
    plot_png(report, tmp)
    tmp.replace(paths["png"])
