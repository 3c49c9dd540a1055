"""TomeMGT forward speed-up on the released Meissonic-1024 transformer config (random weights, bf16, CPU).

    python benchmarks/bench_tomemgt.py --grid table5          # Table 5's settings, ≈ 15 min on one core
    python benchmarks/bench_tomemgt.py --settings joint:0.5:default all:0.75:global --rounds 2

One transformer forward of the sampler: CFG batch 2, 64×64 token grid (1024×1024 px) → 32×32 =
1024 transformer tokens after feature compression, 77 text tokens, one thread. Latency does not
depend on the weight values, so the model is built on the meta device and filled with random
numbers. A setting whose merge count depends on the mask state (a mask-aware `sources` or
`schedule`) is timed on the input ids of several sampling steps (cosine schedule, T = 16: the
masked fraction σ of step i is cos(π/2·i/T), the [MASK] positions drawn at random) and its time is
the mean over them; any other setting costs the same at every step. Every setting is timed in the
same run as no merging, interleaved round by round after a warm-up, as process CPU time on one
thread (what the work costs, not the time a neighbour held the core); medians per (setting, step).
A second part times the matching alone per locality at ratio 0.5.

Settings are written as in benchmarks/table5_tomemgt.py (blocks:ratio:options), so the two join.
Writes benchmarks/results/tomemgt_latency.json and .md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table5_tomemgt import parse_setting, table5_settings, variant_name  # noqa: E402

from mgtq.files import atomic_write_text, write_json  # noqa: E402
from mgtq.merging import TomePlan, apply_tomemgt, remove_tomemgt  # noqa: E402
from mgtq.merging.tome import bipartite_soft_matching_2x2, cell_destinations  # noqa: E402
from mgtq.models.presets import preset_config  # noqa: E402
from mgtq.models.random import random_float_transformer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS, TOTAL_STEPS = (2, 6, 10, 14), 16


def forward_inputs(model, batch: int, grid: int, text_len: int, dtype: torch.dtype, sigma: float, seed: int = 0) -> dict:
    """The sampler's inputs at masked fraction σ: ⌊σ·H·W⌋ ids are [MASK] (random places, same for the CFG pair)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(0, cfg.codebook_size, (grid * grid,), generator=g)
    ids[torch.randperm(grid * grid, generator=g)[: math.floor(sigma * grid * grid)]] = model.mask_token_id
    return dict(
        hidden_states=ids.view(1, grid, grid).expand(batch, -1, -1).contiguous(),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.full((batch,), sigma),
    )


def step_sigma(step: int, total: int = TOTAL_STEPS) -> float:
    """Masked fraction of the sampler's input at step i (cosine schedule, as in mgtq.sampling)."""
    return math.cos(math.pi / 2 * step / total)


def mask_aware(config) -> bool:
    return config.sources != "all" or config.schedule != "constant"


def time_forwards(model, inputs_by_step: dict, settings: dict, rounds: int) -> dict:
    """{(key, step): [CPU s]} of whole forwards for no merging ("none", at the first step) and every
    setting, interleaved round by round after a warm-up."""
    jobs = [("none", STEPS[0])]
    for key, config in settings.items():
        jobs += [(key, s) for s in (STEPS if mask_aware(config) else STEPS[:1])]
    samples = {job: [] for job in jobs}
    with torch.inference_mode():
        model(**inputs_by_step[STEPS[0]])  # warm-up: allocator, oneDNN kernels; merging adds no compiled code
        for round_ in range(1, rounds + 1):
            for key, step in jobs:
                remove_tomemgt(model)
                if key != "none":
                    apply_tomemgt(model, settings[key])
                start = time.process_time()
                model(**inputs_by_step[step])
                samples[(key, step)].append(time.process_time() - start)
                print(f"round {round_} {key:40s} step {step:2d}: {samples[(key, step)][-1]:6.2f} s CPU  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    remove_tomemgt(model)
    return samples


class _Captured(Exception):
    pass


def time_blocks(model, inputs_by_step: dict, settings: dict, repeats: int) -> dict:
    """{(key, step): composed forward CPU s} from one joint and one single-stream block.

    Each block runs on its real input (captured from the model) with the setting's merging at that
    step's mask state, matching included; composed forward = rest + n_joint·joint + n_single·single,
    rest = the forward with no blocks (embedding, compression, head). Blocks are 0.1–0.2 s, so many
    interleaved repeats fit where whole forwards (7 s) allow two.
    """
    joint, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    first = inputs_by_step[STEPS[0]]
    _, height, width = first["hidden_states"].shape
    grid = (height // model.grid_factor, width // model.grid_factor)
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("args", args)
        raise _Captured

    handle = joint.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**first)
    except _Captured:
        pass
    finally:
        handle.remove()
    x, context, temb, rope = captured["args"][:4]
    joined, n_text = torch.cat([context, x], dim=1), context.shape[1]
    masks = {s: inp["hidden_states"] == model.mask_token_id for s, inp in inputs_by_step.items()}

    def run_joint(config, step):
        merge, merge_mlp = (None, None) if config is None else TomePlan(config).bind(grid, masks[step]).plan("joint", 0, x)
        return joint(x, context, temb, rope, merge, merge_mlp)

    def run_single(config, step):
        merge = None if config is None else TomePlan(config).bind(grid, masks[step]).plan("single", 0, x)[0]
        return single(joined, temb, rope, n_text, merge)

    def rest():
        blocks = model.transformer_blocks, model.single_transformer_blocks
        model.transformer_blocks, model.single_transformer_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()
        try:
            model(**first)
        finally:
            model.transformer_blocks, model.single_transformer_blocks = blocks

    jobs = {("rest", 0): rest, ("joint", None, 0): lambda: run_joint(None, STEPS[0]),
            ("single", None, 0): lambda: run_single(None, STEPS[0])}
    for key, config in settings.items():
        for step in STEPS if mask_aware(config) else STEPS[:1]:
            jobs[("joint", key, step)] = lambda c=config, s=step: run_joint(c, s)
            if config.blocks != "joint":
                jobs[("single", key, step)] = lambda c=config, s=step: run_single(c, s)
    samples = {job: [] for job in jobs}
    with torch.inference_mode():
        for fn in jobs.values():
            fn()
        for round_ in range(repeats):
            for job, fn in jobs.items():
                start = time.process_time()
                fn()
                samples[job].append(time.process_time() - start)
            print(f"block round {round_ + 1}/{repeats}, load {os.getloadavg()[0]:.1f}", flush=True)
    median = {job: statistics.median(v) for job, v in samples.items()}
    n_joint, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    composed = {("none", STEPS[0]): median[("rest", 0)] + n_joint * median[("joint", None, 0)]
                + n_single * median[("single", None, 0)]}
    for key, config in settings.items():
        for step in STEPS if mask_aware(config) else STEPS[:1]:
            single_s = median[("single", key, step)] if config.blocks != "joint" else median[("single", None, 0)]
            composed[(key, step)] = median[("rest", 0)] + n_joint * median[("joint", key, step)] + n_single * single_s
    return {"composed": composed, "blocks": {"|".join(map(str, job)): v for job, v in median.items()}}


def time_matching(batch: int, grid: int, dim: int, repeats: int = 20) -> list[dict]:
    """Milliseconds (median, one thread) of one block's matching at ratio 0.5 per locality."""
    g = torch.Generator().manual_seed(0)
    n = grid * grid
    x = torch.randn(batch, n, dim, generator=g).to(torch.bfloat16)
    dst = cell_destinations((grid, grid), torch.Generator().manual_seed(1))
    rows = []
    for locality in ("cell", "window", "global"):
        fn = lambda: bipartite_soft_matching_2x2(x, (grid, grid), n // 2, dst, locality=locality)  # noqa: E731
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        rows.append({"locality": locality, "match_ms": round(statistics.median(times) * 1e3, 2)})
    return rows


def merged_fraction(config, masks_by_step: dict, grid: int) -> float:
    """Mean over the timed steps of the tokens a block merges away, r/N (after every cap)."""
    steps = STEPS if mask_aware(config) else STEPS[:1]
    n, kind = grid * grid, "single" if config.blocks == "single" else "joint"
    out = []
    for step in steps:
        masked = masks_by_step[step]
        x = torch.randn(masked.shape[0], n, 8, generator=torch.Generator().manual_seed(step))
        merge, _ = TomePlan(config).bind((grid, grid), masked).plan(kind, 0, x)
        out.append(0.0 if merge is None else (n - merge.reduce(x).shape[1]) / n)
    return statistics.mean(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=["table5"], default=None, help="Table 5's settings (added to --settings)")
    parser.add_argument("--settings", nargs="*", default=[], help="blocks:ratio:options, as in table5_tomemgt.py")
    parser.add_argument("--block-repeats", type=int, default=7, help="interleaved repeats of the per-block timing")
    parser.add_argument("--forward-settings", nargs="*", default=["joint:0.5:default", "all:0.5:cell"],
                        help="settings also timed as whole forwards, to check the composed figures")
    parser.add_argument("--rounds", type=int, default=2, help="whole-forward rounds (0: none)")
    parser.add_argument("--preset", default="meissonic-1024", help="transformer preset (small ones for smoke runs)")
    parser.add_argument("--token-grid", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--out", type=Path, default=RESULTS / "tomemgt_latency")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keys = (table5_settings() if args.grid else []) + list(args.settings)
    settings = {key: parse_setting(key) for key in keys}  # fail before the slow part
    dtype, batch = torch.bfloat16, 2

    t0, load_before = time.perf_counter(), round(os.getloadavg()[0], 2)
    model = random_float_transformer(preset_config(args.preset), dtype)
    grid = args.token_grid // model.grid_factor
    n_tokens = grid * grid
    inputs = {s: forward_inputs(model, batch, args.token_grid, args.text_tokens, dtype, step_sigma(s), seed=s)
              for s in STEPS}
    masks = {step: inp["hidden_states"] == model.mask_token_id for step, inp in inputs.items()}
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    blocks = time_blocks(model, inputs, settings, args.block_repeats)
    composed = blocks["composed"]
    checked = {key: settings.get(key) or parse_setting(key) for key in args.forward_settings}
    samples = time_forwards(model, inputs, checked, args.rounds) if args.rounds else {}
    base = composed[("none", STEPS[0])]
    base_forward = statistics.median(samples[("none", STEPS[0])]) if samples else None
    rows = [dict(key="none", blocks="-", ratio=0.0, variant="no merging", config=None, cpu_s=base, speedup=1.0,
                 merged_fraction=0.0, per_step_cpu_s=None, forward_cpu_s=base_forward,
                 forward_speedup=1.0 if samples else None)]
    for key, config in {**settings, **checked}.items():
        per_step = {s: t for (k, s), t in composed.items() if k == key}
        cpu = statistics.mean(per_step.values()) if per_step else None
        forward = [statistics.median(v) for (k, _), v in samples.items() if k == key]
        forward_cpu = statistics.mean(forward) if forward else None
        rows.append(dict(key=key, blocks=config.blocks + ("+mlp" if config.merge_mlp else ""), ratio=config.ratio,
                         variant=variant_name(config), config=asdict(config), cpu_s=cpu,
                         speedup=base / cpu if cpu else None, merged_fraction=merged_fraction(config, masks, grid),
                         per_step_cpu_s={str(s): t for s, t in per_step.items()} if len(per_step) > 1 else None,
                         forward_cpu_s=forward_cpu, forward_speedup=base_forward / forward_cpu if forward else None))
    cfg = model.config
    result = {
        "setup": {
            "model": f"{args.preset} (random weights)", "dtype": str(dtype).removeprefix("torch."), "threads": 1,
            "batch": batch, "token_grid": args.token_grid, "transformer_tokens": n_tokens,
            "text_tokens": args.text_tokens, "rounds": args.rounds, "block_repeats": args.block_repeats, "steps": list(STEPS), "total_steps": TOTAL_STEPS,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "command": " ".join(["python benchmarks/bench_tomemgt.py", *argv]),
            "wall_s": round(time.perf_counter() - t0, 1), "load_before": load_before,
            "load_after": round(os.getloadavg()[0], 2),
        },
        "rows": rows,
        "forward_samples": {f"{k}@{s}": v for (k, s), v in samples.items()},
        "block_medians": blocks["blocks"],
        "matching": time_matching(batch, grid, cfg.num_attention_heads * cfg.attention_head_dim),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    write_markdown(args.out.with_suffix(".md"), result)
    print(args.out.with_suffix(".md").read_text())
    return result


def write_markdown(path: Path, result: dict) -> None:
    s = result["setup"]
    lines = [
        f"# TomeMGT forward speed-up — {s['model']} transformer",
        "",
        f"{s['dtype']}, CPU, 1 thread, CFG batch {s['batch']}, {s['token_grid']}×{s['token_grid']} token grid → "
        f"{s['transformer_tokens']} transformer tokens, {s['text_tokens']} text tokens; process CPU time, speed-up "
        "against no merging in the same run. Speed-up = forward composed from one joint and one single-stream "
        f"block on their real inputs (median of {s['block_repeats']} interleaved repeats, matching included; rest + "
        "joint·n_joint + single·n_single); forward = whole forwards (median of "
        f"{s['rounds']} interleaved rounds after a warm-up) for the settings listed, as a check. Mask-aware "
        f"settings: mean over the inputs of sampling steps {s['steps']} of {s['total_steps']} (cosine schedule, "
        "[MASK] at random places); merged r/N = image tokens a merging block removes, mean over those steps. "
        "Quality is in table5_tomemgt.md.",
        "",
        f"Command: `{s['command']}`",
        "",
        "| blocks | ratio | variant | merged r/N | composed CPU s | speed-up | whole-forward speed-up |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        composed = f"{row['cpu_s']:.2f} | {row['speedup']:.3f}×" if row["cpu_s"] else "— | —"
        forward = f"{row['forward_speedup']:.3f}×" if row.get("forward_speedup") else "—"
        lines.append(f"| {row['blocks']} | {row['ratio']} | {row['variant']} | {row['merged_fraction']:.3f} | "
                     f"{composed} | {forward} |")
    lines += ["", f"Matching alone, one block at ratio 0.5 (B = {s['batch']}, N = {s['transformer_tokens']}, bf16 input), median ms on one thread:", "",
              "| locality | matching ms |", "| --- | ---: |"]
    lines += [f"| {r['locality']} | {r['match_ms']} |" for r in result["matching"]]
    lines += ["", f"Load average (1 min) before / after: {s['load_before']} / {s['load_after']} on {os.cpu_count()} "
              f"cores; wall time {s['wall_s']} s.", ""]
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
