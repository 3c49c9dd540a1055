"""TomeMGT latency on the released Meissonic-1024 transformer config (random weights, bf16, CPU).

    python benchmarks/bench_tomemgt.py                 # ≈ 6–10 min on 2 cores
    python benchmarks/bench_tomemgt.py --repeats 5 --settings joint:0.5 all:0.5

One transformer forward of the sampler: CFG batch 2, 64×64 token grid (1024×1024 px) → 32×32 =
1024 transformer tokens after feature compression, 77 text tokens. Latency does not depend on the
weight values, so the model is built on the meta device and filled with random numbers. Every
setting is timed in the same run as ratio 0, interleaved round by round (so a neighbour's load
hits all settings alike), after a warm-up; medians are reported. A second part times the
merge machinery alone (matching, merge, unmerge, RoPE merge) on one block's input.

Writes benchmarks/results/tomemgt_latency.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mgtq.merging import TomeConfig, TomePlan, apply_tomemgt, remove_tomemgt
from mgtq.merging.tome import bipartite_soft_matching_2x2, cell_destinations
from mgtq.models import build_transformer
from mgtq.utils import atomic_write_text, write_json

RESULTS = Path(__file__).parent / "results"
DEFAULT_SETTINGS = ["joint:0.25", "joint:0.5", "joint:0.75", "all:0.25", "all:0.5", "all:0.75"]


def random_transformer(preset: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A preset with random values (N(0, 0.02) weights, unit norms); meissonic-1024 ≈ 2 GB in bf16."""
    model = build_transformer(preset, empty=True).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.to(dtype).eval()


def forward_inputs(model, batch: int, grid: int, text_len: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randint(0, cfg.codebook_size, (batch, grid, grid), generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.full((batch,), 0.5),
    )


def parse_setting(text: str) -> tuple[str, float, bool]:
    """'joint:0.5' or 'joint+mlp:0.5' → (blocks, ratio, merge_mlp)."""
    blocks, ratio = text.split(":")
    merge_mlp = blocks.endswith("+mlp")
    return blocks.removesuffix("+mlp"), float(ratio), merge_mlp


def time_forwards(model, inputs, settings: list[str], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per forward for ratio 0 and each setting, interleaved round by
    round after one warm-up. CPU time is less disturbed by a neighbour than wall time (it does not
    count time the scheduler gave to another process), so both are kept."""
    names = ["baseline"] + settings
    times = {name: {"wall": [], "cpu": []} for name in names}
    with torch.inference_mode():
        model(**inputs)  # warm-up: allocator, oneDNN kernels; merging adds no compiled code
        for round_ in range(1, repeats + 1):
            for name in names:
                remove_tomemgt(model)
                if name != "baseline":
                    blocks, ratio, merge_mlp = parse_setting(name)
                    apply_tomemgt(model, ratio, blocks=blocks, merge_mlp=merge_mlp, generator=0)
                wall, cpu = time.perf_counter(), time.process_time()
                model(**inputs)
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
                print(f"round {round_} {name:12s} wall {times[name]['wall'][-1]:6.2f} s  cpu "
                      f"{times[name]['cpu'][-1]:6.2f} s  load {os.getloadavg()[0]:.1f}", flush=True)
    remove_tomemgt(model)
    return times


def time_blocks(model, inputs, ratios: tuple[float, ...], repeats: int) -> dict:
    """Per-block CPU time on one thread, and the forward time composed from it.

    Times one joint and one single-stream block on their real inputs (from the embedding), with
    and without merging, plus the rest of the model (embedding, compression, head: the forward
    with the block lists emptied). On one thread, `time.thread_time()` counts only the CPU time
    the work itself took, not the time a neighbour held the core, nor the barrier stalls that
    2-thread parallel regions suffer when one thread is descheduled; so this part stays readable
    on a shared machine. Merged timings include the whole merge machinery (matching on the block
    input, RoPE merge, merge, unmerge). Composed forward = rest + 14·joint + 28·single (medians).
    """
    joint, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    _, height, width = inputs["hidden_states"].shape
    grid = (height // model.grid_factor, width // model.grid_factor)
    captured = {}

    def capture(module, args, kwargs):  # the first joint block's real inputs
        captured.setdefault("args", args)
        raise _Captured

    handle = joint.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    x, context, temb, rope = captured["args"][:4]
    joined = torch.cat([context, x], dim=1)
    n_text = context.shape[1]

    def plan(ratio, kind, merge_mlp):
        config = TomeConfig(ratio=ratio, blocks="all", merge_mlp=merge_mlp)
        return TomePlan(config).bind(grid).plan(kind, 0, x)

    def rest():
        blocks = model.transformer_blocks, model.single_transformer_blocks
        model.transformer_blocks, model.single_transformer_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()
        try:
            model(**inputs)
        finally:
            model.transformer_blocks, model.single_transformer_blocks = blocks

    variants = {("rest", "—", 0.0): rest, ("joint", "none", 0.0): lambda: joint(x, context, temb, rope),
                ("single", "none", 0.0): lambda: single(joined, temb, rope, n_text)}
    for ratio in ratios:
        variants[("joint", "attn", ratio)] = lambda r=ratio: joint(x, context, temb, rope, *plan(r, "joint", False))
        variants[("joint", "attn+MLP", ratio)] = lambda r=ratio: joint(x, context, temb, rope, *plan(r, "joint", True))
        variants[("single", "attn+MLP (fused)", ratio)] = (
            lambda r=ratio: single(joined, temb, rope, n_text, plan(r, "single", False)[0]))
    samples = {key: [] for key in variants}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for fn in variants.values():
                fn()
            for round_ in range(repeats):
                for key, fn in variants.items():
                    start = time.thread_time()
                    fn()
                    samples[key].append(time.thread_time() - start)
                print(f"block round {round_ + 1}/{repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    median = {key: statistics.median(v) for key, v in samples.items()}
    rows = [dict(block=kind, merge_before=merged, ratio=ratio, cpu_median_s=median[(kind, merged, ratio)],
                 cpu_min_s=min(samples[(kind, merged, ratio)]),
                 speedup=median[(kind, "none", 0.0)] / median[(kind, merged, ratio)] if kind != "rest" else 1.0)
            for kind, merged, ratio in variants]

    n_joint, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    rest_s = median[("rest", "—", 0.0)]
    base = rest_s + n_joint * median[("joint", "none", 0.0)] + n_single * median[("single", "none", 0.0)]
    composed = [dict(blocks="none", merge_before="—", ratio=0.0, forward_s=base, speedup=1.0)]
    for ratio in ratios:
        for blocks, joint_key, single_key in (
            ("joint", "attn", "none"), ("joint", "attn+MLP", "none"),
            ("all", "attn", "attn+MLP (fused)"), ("all", "attn+MLP", "attn+MLP (fused)"),
        ):
            t = (rest_s + n_joint * median[("joint", joint_key, ratio)]
                 + n_single * median[("single", single_key, ratio if single_key != "none" else 0.0)])
            composed.append(dict(blocks=blocks, merge_before=f"attn{'+MLP' if joint_key != 'attn' else ''} (joint)",
                                 ratio=ratio, forward_s=t, speedup=base / t))
    return {"rows": rows, "composed": composed}


class _Captured(Exception):
    pass


def time_merge_ops(batch: int, n_tokens: int, grid: int, dim: int, head_dim: int, dtype, repeats: int = 20) -> dict:
    """Milliseconds of one block's matching, merge, unmerge and RoPE merge (cos and sin), per ratio.

    Each as [median wall ms with the benchmark's threads, median CPU ms on one thread]: the second
    is what the op costs; the first adds what a busy neighbour does to small 2-thread ops.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_tokens, dim, generator=g).to(dtype)
    rope = torch.randn(n_tokens, head_dim, generator=g)
    threads = torch.get_num_threads()

    def median_ms(fn):
        out = []
        for n_threads, clock in ((threads, time.perf_counter), (1, time.thread_time)):
            torch.set_num_threads(n_threads)
            fn()
            samples = []
            for _ in range(repeats):
                start = clock()
                fn()
                samples.append(clock() - start)
            out.append(round(statistics.median(samples) * 1e3, 2))
        torch.set_num_threads(threads)
        return out

    result = {}
    for ratio in (0.25, 0.5, 0.75):
        r = int(ratio * n_tokens)
        dst = cell_destinations((grid, grid), torch.Generator().manual_seed(1))
        merge, unmerge = bipartite_soft_matching_2x2(x, (grid, grid), r, dst)
        merged = merge(x)
        result[str(ratio)] = {
            "match_ms": median_ms(lambda: bipartite_soft_matching_2x2(x, (grid, grid), r, dst)),
            "merge_ms": median_ms(lambda: merge(x)),
            "unmerge_ms": median_ms(lambda: unmerge(merged)),
            "rope_merge_ms": median_ms(lambda: (merge(rope.expand(batch, -1, -1)), merge(rope.expand(batch, -1, -1)))),
        }
    return result


def findings(result: dict) -> list[str]:
    """What the numbers of one run say, in words (stored in the JSON, listed under the tables)."""
    s, rows = result["setup"], result["rows"]
    composed = {(r["blocks"], r["merge_before"], r["ratio"]): r for r in result["composed"]}
    blocks = {(r["block"], r["merge_before"], r["ratio"]): r for r in result["blocks"]}
    base = rows[0]
    base_1t = composed[("none", "—", 0.0)]["forward_s"]
    joint_share = s["joint_blocks"] * blocks[("joint", "none", 0.0)]["cpu_median_s"] / base_1t
    rest_share = blocks[("rest", "—", 0.0)]["cpu_median_s"] / base_1t
    machinery = result["merge_ops"]["0.5"]
    machinery_ms = sum(machinery[k][1] for k in ("match_ms", "merge_ms", "unmerge_ms", "rope_merge_ms"))
    spread = (max(base["samples_wall_s"]) - min(base["samples_wall_s"])) / base["median_s"]

    def c(blocks_, mlp, ratio):
        return composed[(blocks_, "attn+MLP (joint)" if mlp else "attn (joint)", ratio)]["speedup"]

    reached = [f"{b}{' + MLP' if m else ''}" for b in ("joint", "all") for m in (False, True) if c(b, m, 0.5) >= 1.4]

    return [
        f"Whole forwards, {s['threads']} threads: ratio 0 alone ranged over {spread:.0%} of its median "
        f"(load average {s['load_before']}–{s['load_after']} on {os.cpu_count()} cores), more than most effects "
        f"measured; a forward used {base['cpu_median_s']:.1f} s of CPU at {s['threads']} threads against "
        f"{base_1t:.1f} s on one thread: when a neighbour holds a core, every {s['threads']}-thread parallel "
        "region waits for the descheduled thread. Read the composed table for speed-ups.",
        f"Paper setting (joint blocks, merge before attention) at ratio 0.5: {c('joint', False, 0.5):.3f}× "
        f"(paper: 1.05×). Joint blocks are {s['joint_blocks']} of {s['joint_blocks'] + s['single_blocks']} and "
        f"take {joint_share:.0%} of the forward; attention is about a third of their image-token work, so "
        f"joint-only merging is bounded (also merging before the MLP: {c('joint', True, 0.5):.3f}×; ratio 0.75: "
        f"{c('joint', False, 0.75):.3f}× / {c('joint', True, 0.75):.3f}×).",
        "The issue's goal, ≥ 1.4× at ratio 0.5: "
        + (", ".join(reached) + " reach it" if reached else "no setting reaches it")
        + f"; blocks=all gives {c('all', False, 0.5):.3f}× (attention-only in joint blocks) and "
        f"{c('all', True, 0.5):.3f}× (joint blocks also before the MLP); joint-only at most "
        f"{max(c('joint', m, 0.5) for m in (False, True)):.3f}×. Single-stream merging failed in quality in the "
        "paper; measure quality before using it.",
        f"The merge machinery costs {machinery_ms:.1f} ms per block on one thread at ratio 0.5 (matching "
        f"{machinery['match_ms'][1]} ms, mostly the float32 similarity product; merge {machinery['merge_ms'][1]}, "
        f"unmerge {machinery['unmerge_ms'][1]}, RoPE {machinery['rope_merge_ms'][1]}), "
        f"{machinery_ms / 1e3 / blocks[('joint', 'none', 0.0)]['cpu_median_s']:.0%} of a joint block: "
        "at ratio 0.25 attention-only merging saves less than that "
        f"({blocks[('joint', 'attn', 0.25)]['speedup']:.3f}× per joint block).",
        f"Embedding, feature compression and the 8192-way head are {rest_share:.0%} of the forward and never merge.",
        "r = ⌊ratio·N⌋ is capped at the 3N/4 sources (one destination per 2×2 cell): ratio 0.75 keeps N/4 "
        "tokens.",
    ]


def write_markdown(path: Path, result: dict) -> None:
    s = result["setup"]
    lines = [
        f"# TomeMGT latency — {s['model']} transformer, one forward",
        "",
        f"Random weights, {s['dtype']}, CPU {s['threads']} threads, CFG batch {s['batch']}, "
        f"{s['token_grid']}×{s['token_grid']} token grid → {s['transformer_tokens']} transformer tokens, "
        f"{s['text_tokens']} text tokens. Median of {s['repeats']} interleaved rounds after a warm-up; "
        "speed-up against ratio 0 of the same run. Quality is not measured here.",
        "",
        f"Command: `{s['command']}`",
        "",
        "| blocks | merge before | ratio | tokens kept / block | median s | speed-up (median) | "
        "speed-up (min) | CPU s | speed-up (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['blocks']} | {row['merge_before']} | {row['ratio']} | {row['tokens_kept']} | "
            f"{row['median_s']:.2f} | {row['speedup']:.3f}× | {row['speedup_min']:.3f}× | "
            f"{row['cpu_median_s']:.2f} | {row['speedup_cpu']:.3f}× |"
        )
    lines += [
        "",
        f"Forward composed from one-thread CPU time per block (median of {s['block_repeats']} interleaved rounds; "
        f"rest + {s['joint_blocks']}·joint + {s['single_blocks']}·single). CPU time of the work itself, so it "
        "is not disturbed by a neighbour; read it as the speed-up on a quiet machine:",
        "",
        "| blocks | merge before | ratio | composed CPU s (1 thread) | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["composed"]:
        lines.append(f"| {row['blocks']} | {row['merge_before']} | {row['ratio']} | {row['forward_s']:.2f} | "
                     f"{row['speedup']:.3f}× |")
    lines += [
        "",
        "One block alone on its real input, one thread, CPU s (merged timings include matching, RoPE merge, "
        "merge and unmerge; rest = embedding, compression and head):",
        "",
        "| block | merge before | ratio | median CPU s | min CPU s | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["blocks"]:
        lines.append(f"| {row['block']} | {row['merge_before']} | {row['ratio']} | {row['cpu_median_s']:.3f} | "
                     f"{row['cpu_min_s']:.3f} | {row['speedup']:.3f}× |")
    lines += [
        "",
        f"Merge machinery alone per block, median ms: {s['threads']}-thread wall / 1-thread CPU (B = {s['batch']}, "
        f"N = {s['transformer_tokens']}, D = {s['dim']}; RoPE merge = cos and sin tables):",
        "",
        "| ratio | matching | merge | unmerge | RoPE merge |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ratio, ops in result["merge_ops"].items():
        keys = ("match_ms", "merge_ms", "unmerge_ms", "rope_merge_ms")
        cells = " | ".join(f"{ops[k][0]} / {ops[k][1]}" for k in keys)
        lines.append(f"| {ratio} | {cells} |")
    lines += ["", f"Load average (1 min) before / after: {s['load_before']} / {s['load_after']} "
              f"on {os.cpu_count()} cores; wall time {s['wall_s']} s.", ""]
    lines += ["", "Findings:", "", *(f"- {note}" for note in result["notes"]), ""]
    atomic_write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help="blocks:ratio, blocks in joint|single|all, optional +mlp (e.g. joint+mlp:0.5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="meissonic-1024", help="transformer preset (small ones for smoke runs)")
    parser.add_argument("--block-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--token-grid", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--out", type=Path, default=RESULTS / "tomemgt_latency")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the existing JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["notes"] = findings(result)
        write_json(args.out.with_suffix(".json"), result)
        write_markdown(args.out.with_suffix(".md"), result)
        return result
    torch.set_num_threads(args.threads)
    dtype, batch = torch.bfloat16, 2

    for setting in args.settings:  # fail before the slow part
        blocks, ratio, _ = parse_setting(setting)
        TomeConfig(ratio=ratio, blocks=blocks)

    t0, load_before = time.perf_counter(), round(os.getloadavg()[0], 2)
    model = random_transformer(args.preset, dtype)
    inputs = forward_inputs(model, batch, args.token_grid, args.text_tokens, dtype)
    grid = args.token_grid // model.grid_factor
    n_tokens = grid * grid
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)

    times = time_forwards(model, inputs, args.settings, args.repeats)
    base = {k: statistics.median(v) for k, v in times["baseline"].items()}
    base_min = min(times["baseline"]["wall"])
    rows = []
    for name in ["baseline", *args.settings]:
        blocks, ratio, merge_mlp = ("none", 0.0, False) if name == "baseline" else parse_setting(name)
        wall, cpu = statistics.median(times[name]["wall"]), statistics.median(times[name]["cpu"])
        kept = n_tokens - min(int(ratio * n_tokens + 1e-9), n_tokens - n_tokens // 4)
        rows.append(dict(
            blocks=blocks, merge_before="—" if name == "baseline" else ("attn+MLP" if merge_mlp else "attn"),
            ratio=ratio, tokens_kept=kept, median_s=wall, min_s=min(times[name]["wall"]), cpu_median_s=cpu,
            speedup=base["wall"] / wall, speedup_min=base_min / min(times[name]["wall"]),
            speedup_cpu=base["cpu"] / cpu, samples_wall_s=times[name]["wall"], samples_cpu_s=times[name]["cpu"],
        ))

    block_rows = time_blocks(model, inputs, ratios=(0.25, 0.5, 0.75), repeats=args.block_repeats)
    cfg = model.config
    merge_ops = time_merge_ops(batch, n_tokens, grid, cfg.num_attention_heads * cfg.attention_head_dim,
                               cfg.attention_head_dim, dtype)
    result = {
        "setup": {
            "model": f"{args.preset} (random weights)", "dtype": str(dtype).removeprefix("torch."),
            "threads": args.threads, "batch": batch, "token_grid": args.token_grid,
            "transformer_tokens": n_tokens, "text_tokens": args.text_tokens, "repeats": args.repeats,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "command": " ".join(["python benchmarks/bench_tomemgt.py", *argv]),
            "dim": cfg.num_attention_heads * cfg.attention_head_dim,
            "joint_blocks": cfg.num_layers, "single_blocks": cfg.num_single_layers,
            "block_repeats": args.block_repeats, "wall_s": round(time.perf_counter() - t0, 1),
            "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
        },
        "rows": rows,
        "blocks": block_rows["rows"],
        "composed": block_rows["composed"],
        "merge_ops": merge_ops,
    }
    result["notes"] = findings(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    write_markdown(args.out.with_suffix(".md"), result)
    print(args.out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
