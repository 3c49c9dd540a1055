"""Context reuse speed-up on a random-weight transformer (CPU): per-step costs composed over the schedule.

    python benchmarks/bench_reuse.py --model meissonic-1024 --sampler vanilla --reuse-interval 3 --steps 48 \
        --threads 1 --formats bf16,scq --json reuse_speed.json [--compile] [--check]

One sampler call: CFG batch 2, 77 text tokens, a --grid × --grid VQ grid (meissonic-1024 at 1024 px: 64×64,
32×32 = 1024 transformer tokens). Latency does not depend on the weight values, so the model has random
weights; quantized formats are built with `mgtq.quantize_` (w4a8: every Linear W4A8; scq: a seeded
random third W4A8 and the rest W4A16, standing in for the lowest-magnitude third; int8 scales fixed,
since values do not change speed; `-cached`: with the W4A8 layers' opt-in int8 weight cache, as in
`mgtq bench`).

What is timed, per format, interleaved round by round after a warm-up (medians; `--clock`: process CPU time by
default at 1 thread, wall-clock time with more, where CPU time adds the threads up and hides a step that leaves one
idle):
- the plain forward (no hook): the step of the sampler without acceleration;
- the full step (the same forward, recording every block's keys/values);
- each local step the schedule produces: the sampler's counts (`num_to_mask` on the config's schedule)
  decide how many VQ tokens each step decodes; which ones is drawn at random (what a random-weight
  model's confidence amounts to), so each run of local steps gets its active set and transformer
  token count.
Composed: baseline = T × plain; reuse = Σ full + Σ local over the schedule; `speedup` = baseline / reuse.
`--check` also runs the whole sampler once without and once with reuse (same seed) and reports the
measured ratio beside the composed one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from mgtq import argtypes
from mgtq.bench.build import quantize_in_format_, with_weight_cache
from mgtq.bench.formats import Format
from mgtq.files import write_json
from mgtq.models.presets import preset_config
from mgtq.models.random import random_float_transformer
from mgtq.reuse import ContextCache, active_tokens
from mgtq.sampling import SamplerConfig, classifier_free_guidance
from mgtq.sampling.cli_args import add_sampler_arguments, sampler_config_from_args
from mgtq.sampling.maskgit import num_to_mask, sample
from mgtq.sampling.tricks.reuse import most_confident_cells

FORMATS = ("fp32", "bf16", "w4a16", "w4a8", "scq", "w4a8-cached", "scq-cached")
TEXT_TOKENS = 77
INPUT_SCALE = 0.05  # int8 activation scale of the random-weight W4A8 layers (speed does not depend on it)


def build(preset: str, fmt: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight transformer of `preset` in format `fmt` (see the module docstring)."""
    model = random_float_transformer(preset_config(preset), torch.float32 if fmt == "fp32" else torch.bfloat16, seed)
    if fmt not in ("fp32", "bf16"):
        parsed = Format.parse(fmt)
        quantize_in_format_(model, parsed, INPUT_SCALE, seed)
        if parsed.cached:  # the opt-in int8 weight cache of the W4A8 layers (mgtq bench's -cached formats)
            with_weight_cache(model, [])
    return model.eval()


def schedule_plan(config: SamplerConfig, grid: tuple[int, int], seed: int = 0) -> list[dict]:
    """Per step: {"step", "full", "active" (1, H, W) bool or None}: the schedule's counts, random positions.

    Tokens decode in one random order; the local steps after a full step compute the tokens it decoded
    plus, with group "confidence", those decoded before the next full step, with "cells" as many taken
    in whole 2×2 cells of random scores, or with "masked", every token masked at its input
    (mgtq.sampling.maskgit._ContextReuse).
    """
    n = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    masked_before, masked = [], torch.tensor([n])
    for step in range(config.num_steps):
        masked_before.append(int(masked))
        masked = num_to_mask(config, step, n, masked)
    masked_before.append(0)
    reuse, steps, active = config.reuse, [], None
    for step in range(config.num_steps):
        full = not reuse.enabled or reuse.is_full(step)
        if full and reuse.enabled:
            until = step + 1
            while until < config.num_steps and not reuse.is_full(until):
                until += 1
            stop = n if reuse.group == "masked" else n - masked_before[until]
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[order[n - masked_before[step]:stop]] = True
            if reuse.group == "cells":  # the group in whole 2×2 cells, by random cell scores
                decoded_now = torch.zeros(n, dtype=torch.bool)
                decoded_now[order[n - masked_before[step]:n - masked_before[step + 1]]] = True
                left = ~torch.zeros(n, dtype=torch.bool)
                left[order[:n - masked_before[step + 1]]] = False
                size = torch.tensor([masked_before[step + 1] - masked_before[until]])
                scores = torch.rand(1, n, generator=generator)
                chosen = decoded_now | most_confident_cells(scores, left[None], size, grid)[0]
            active = chosen.view(1, *grid)
        steps.append({"step": step, "full": full, "active": None if full else active})
    return steps


def local_sets(plan: list[dict]) -> list[dict]:
    """The distinct active sets of a `schedule_plan` (consecutive local steps share one), each with its
    number of steps: {"active", "steps"}. One timed call stands for all the steps of a set."""
    sets, last = [], None
    for entry in plan:
        if entry["active"] is not None and entry["active"] is not last:
            last = entry["active"]
            sets.append({"active": last, "steps": 0})
        if entry["active"] is not None:
            sets[-1]["steps"] += 1
    return sets


class Case:
    """Inputs of one sampler forward (CFG batch 2) and the calls to time on them."""

    def __init__(self, model, grid: tuple[int, int], seed: int = 0, bucket: int = 1):
        g = torch.Generator().manual_seed(seed)
        cfg, dtype = model.config, next(p for p in model.parameters() if p.is_floating_point()).dtype
        ids = torch.randint(0, cfg.codebook_size, (1, *grid), generator=g)
        self.model = model
        self.inputs = dict(hidden_states=ids.expand(2, -1, -1).contiguous(),
                           encoder_hidden_states=torch.randn(2, TEXT_TOKENS, cfg.joint_attention_dim, generator=g).to(dtype),
                           pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g).to(dtype),
                           timestep=torch.full((2,), 0.5))
        self.cache = ContextCache(bucket)

    def plain(self):
        self.model(**self.inputs)

    def full(self):
        self.model(**self.inputs, token_hook=self.cache.full_step())

    def local(self, active: torch.Tensor):
        self.model(**self.inputs, token_hook=self.cache.local_step(active))


CLOCKS = {"cpu": ("process CPU time", time.process_time), "wall": ("wall-clock time", time.perf_counter)}


def seconds_on(fn, clock: str = "cpu") -> float:
    """Seconds `fn()` takes on `clock` (a key of CLOCKS)."""
    read = CLOCKS[clock][1]
    start = read()
    fn()
    return read() - start


@torch.inference_mode()
def measure_format(preset: str, fmt: str, config: SamplerConfig, grid: tuple[int, int], rounds: int, compile_: bool,
                   check: bool, seed: int, clock: str = "cpu") -> dict:
    model = build(preset, fmt, seed)
    if compile_:
        model.compile_blocks(persistent_cache=False)
    plan = schedule_plan(config, grid, seed)
    case = Case(model, grid, seed, config.reuse.bucket)
    locals_ = local_sets(plan)
    calls = {"plain": case.plain, "full": case.full}
    for k, item in enumerate(locals_):
        calls[f"local{k}"] = lambda a=item["active"]: case.local(a)
    case.full()  # the cache the local steps read
    for fn in calls.values():  # warm-up (and compile)
        fn()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(seconds_on(fn, clock))
    median = {name: statistics.median(values) for name, values in times.items()}
    n_full = sum(entry["full"] for entry in plan)
    composed = n_full * median["full"] + sum(item["steps"] * median[f"local{k}"] for k, item in enumerate(locals_))
    baseline = config.num_steps * median["plain"]
    row = {
        "plain_step_s": median["plain"], "full_step_s": median["full"], "full_steps": n_full,
        "local_steps": [{"steps": item["steps"], "active_vq_tokens": int(item["active"].sum()),
                         "active_tokens": int(active_tokens(item["active"], _grid_of(model, grid)).sum()),
                         "seconds": median[f"local{k}"]} for k, item in enumerate(locals_)],
        "baseline_s": baseline, "reuse_s": composed, "speedup": baseline / composed,
    }
    if check:
        row["check"] = whole_image_check(model, config, grid, seed, clock)
    return row


def _grid_of(model, grid):
    f = model.grid_factor
    return grid[0] // f, grid[1] // f


def whole_image_check(model, config: SamplerConfig, grid: tuple[int, int], seed: int, clock: str = "cpu") -> dict:
    """One sampler call without and one with reuse (same seed): seconds on `clock` and their ratio."""
    case = Case(model, grid, seed)
    scale = config.guidance_scale

    def model_fn(tokens, timestep, token_hook=None):
        logits = model(hidden_states=torch.cat([tokens, tokens]), encoder_hidden_states=case.inputs["encoder_hidden_states"],
                       pooled_projections=case.inputs["pooled_projections"], timestep=torch.cat([timestep, timestep]),
                       token_hook=token_hook)
        return classifier_free_guidance(*logits.chunk(2), scale)

    seconds = {}
    for name, run_config in (("baseline", config.replace(reuse={})), ("reuse", config)):
        generators = [torch.Generator().manual_seed(seed)]
        seconds[name] = seconds_on(lambda c=run_config, g=generators: sample(
            model_fn, 1, grid, model.mask_token_id, c, g, progress=False), clock)
    return {"baseline_s": seconds["baseline"], "reuse_s": seconds["reuse"],
            "speedup": seconds["baseline"] / seconds["reuse"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="meissonic-1024", help="a transformer preset of mgtq.models.presets")
    parser.add_argument("--grid", type=argtypes.integer(minimum=2), default=64,
                        help="VQ tokens per image side (meissonic-1024: 64 for 1024 px)")
    parser.add_argument("--steps", type=argtypes.integer(minimum=1), default=48, help="sampler steps T")
    parser.add_argument("--formats", type=argtypes.comma_list(str), default="bf16,scq",
                        help=f"comma list of {','.join(FORMATS)}")
    parser.add_argument("--rounds", type=argtypes.integer(minimum=1), default=3, help="timed calls per step kind")
    parser.add_argument("--threads", type=argtypes.integer(minimum=1), default=1, help="torch threads")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default=None,
                        help="what a timing reads: cpu (process CPU time) or wall; default cpu at 1 thread, else wall")
    parser.add_argument("--compile", action="store_true", help="compile the blocks (mgtq's regional compilation)")
    parser.add_argument("--check", action="store_true", help="also time one whole image without and with reuse")
    parser.add_argument("--seed", type=argtypes.seed, default=0)
    parser.add_argument("--json", type=Path, required=True, help="output JSON")
    add_sampler_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        parser.error(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    config = sampler_config_from_args(args, SamplerConfig(num_steps=args.steps))
    if not config.reuse.enabled:
        parser.error("the sampler has no context reuse: pass --reuse-interval N (N ≥ 2) or a preset that has it")
    if config.reuse.refresh:
        parser.error("the composed per-step costs do not model K/V refresh (its extra rows depend on attention); "
                     "time a refresh setting whole with `mgtq bench --model meissonic-1024 --steps 48 --reuse-refresh R`")
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    grid = (args.grid, args.grid)
    result = {"command": " ".join(["python", "benchmarks/bench_reuse.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": args.model, "grid": args.grid, "steps": args.steps, "threads": args.threads,
              "rounds": args.rounds, "compile": args.compile, "sampler": config.to_dict(),
              "timing": f"{CLOCKS[clock][0]}, median of rounds", "loadavg_start": list(os.getloadavg()),
              "formats": {}}
    for fmt in args.formats:
        result["formats"][fmt] = measure_format(args.model, fmt, config, grid, args.rounds, args.compile, args.check,
                                                args.seed, clock)
        row = result["formats"][fmt]
        print(f"{fmt}: plain {row['plain_step_s']:.3f} s, full {row['full_step_s']:.3f} s, "
              f"{len(row['local_steps'])} local sets; composed speed-up {row['speedup']:.2f}×"
              + (f", whole image {row['check']['speedup']:.2f}×" if "check" in row else ""))
    result["loadavg_end"] = list(os.getloadavg())
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
