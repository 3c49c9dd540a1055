"""The sampler's own work per step, without the model: MaskGIT sampling over a stub model's fixed logits.

    python benchmarks/bench_sampler.py --grid 64 --codebook 8192 --steps 12 --threads 1 \
        --json benchmarks/results/sampler_overhead_64x64.json

The stub returns the same CFG pair of bf16 logits (B = 2, channels last, as the transformer's head
writes them) at every call, guided as `mgtq.sampling.classifier_free_guidance` does for the pipeline, so
what is timed is what a plain sampler step costs on top of the transformer forward: guidance, the
finite check, softmax, the token draw (`torch.multinomial` over every position, as the official sampler
draws) and the confidence ranking. Process CPU time per step, median of --rounds whole sampler calls;
one profiled call splits it by operator (torch.profiler self time).
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
from mgtq.files import write_json
from mgtq.sampling import SamplerConfig, classifier_free_guidance
from mgtq.sampling.maskgit import sample


def stub_model(grid: int, codebook: int, scale: float, seed: int):
    """model_fn of `sample`: the same guided logits (1, V, H, W) at every call."""
    g = torch.Generator().manual_seed(seed)
    pair = torch.randn(2, grid, grid, codebook, generator=g).to(torch.bfloat16).permute(0, 3, 1, 2)

    def model_fn(tokens, timestep, token_hook=None):
        return classifier_free_guidance(*pair.chunk(2), scale)

    return model_fn


def run_once(model_fn, grid: int, mask_id: int, config: SamplerConfig, seed: int) -> float:
    start = time.process_time()
    sample(model_fn, 1, (grid, grid), mask_id, config, [torch.Generator().manual_seed(seed)], progress=False)
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=argtypes.integer(minimum=2), default=64, help="VQ tokens per image side")
    parser.add_argument("--codebook", type=argtypes.integer(minimum=2), default=8192, help="codebook size V")
    parser.add_argument("--steps", type=argtypes.integer(minimum=1), default=12, help="sampler steps per call")
    parser.add_argument("--rounds", type=argtypes.integer(minimum=1), default=3, help="timed sampler calls")
    parser.add_argument("--threads", type=argtypes.integer(minimum=1), default=1, help="torch threads")
    parser.add_argument("--seed", type=argtypes.seed, default=0)
    parser.add_argument("--json", type=Path, required=True, help="output JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = SamplerConfig(num_steps=args.steps)
    model_fn = stub_model(args.grid, args.codebook, config.guidance_scale, args.seed)
    mask_id = args.codebook  # any id outside the codebook
    run_once(model_fn, args.grid, mask_id, config, args.seed)  # warm-up
    per_step = [run_once(model_fn, args.grid, mask_id, config, args.seed) / args.steps for _ in range(args.rounds)]
    with torch.profiler.profile() as prof:
        run_once(model_fn, args.grid, mask_id, config, args.seed)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    result = {
        "command": " ".join(["python", "benchmarks/bench_sampler.py", *(sys.argv[1:] if argv is None else argv)]),
        "grid": args.grid, "codebook": args.codebook, "steps": args.steps, "threads": args.threads,
        "timing": "process CPU time per sampler step, median of rounds [min, max]",
        "per_step_s": statistics.median(per_step), "per_step_range_s": [min(per_step), max(per_step)],
        "profile_self_fraction": {e.key: e.self_cpu_time_total / total for e in events},  # largest first
        "loadavg": list(os.getloadavg()),
    }
    write_json(args.json, result)
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(result["profile_self_fraction"].items())[:3])
    print(f"sampler step without the model: {result['per_step_s']:.3f} s; self-time shares: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
