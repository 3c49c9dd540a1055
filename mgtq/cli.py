"""`mgtq` command line: a thin layer, each command is one call into the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-shapes"


def default_model() -> Path:
    """The embedded default model (checkpoints/tiny-shapes of the repository)."""
    if not DEFAULT_MODEL.is_dir():
        raise SystemExit(
            f"the embedded default model is not at {DEFAULT_MODEL}; install mgtq from its repository with "
            "`pip install -e .` or pass --model DIR"
        )
    return DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the embedded tiny-shapes model)")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="separate CLIP text encoder folder (the official Meissonic setup keeps it apart)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="transformer/text encoder dtype (default: as saved)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (fullgraph; the first step pays the compile time)")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    from mgtq.sampling.cli_args import add_sampler_arguments

    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    add_sampler_arguments(p)
    p.add_argument("--tome", type=float, default=None, metavar="RATIO",
                   help="TomeMGT token merging: merge this fraction of image tokens per block (0 = off)")
    p.add_argument("--tome-blocks", choices=["joint", "single", "all"], default="joint",
                   help="blocks that merge (joint = multi-modal blocks, the paper's setting)")


def _sampler(args, pipe):
    """The checkpoint's sampler settings, then the preset/trick flags, then --steps/--cfg."""
    from mgtq.sampling.cli_args import sampler_config_from_args

    config = sampler_config_from_args(args, pipe.settings.sampler)
    overrides = {k: v for k, v in (("num_steps", args.steps), ("guidance_scale", args.cfg)) if v is not None}
    return config.replace(**overrides) if overrides else config


def _load_pipe(args):
    import torch

    from mgtq.pipeline import load

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load(args.model or default_model(), text_encoder=args.text_encoder, torch_dtype=dtype, device=device)
    if getattr(args, "tome", None):
        from mgtq.merging import apply_tomemgt

        apply_tomemgt(pipe, args.tome, blocks=args.tome_blocks)
    if args.compile:
        pipe.compile()
    return pipe


def cmd_generate(args) -> int:
    from mgtq.generate import generate_to_files

    pipe = _load_pipe(args)
    paths = generate_to_files(
        pipe, args.prompt, out=args.out, negative_prompt=args.negative_prompt, seed=args.seed, height=args.height,
        width=args.width, num_images=args.num_images, progress=not args.no_progress, sampler=_sampler(args, pipe),
    )
    for path in paths:
        print(path)
    return 0


def cmd_eval(args) -> int:
    from mgtq.evaluation import evaluate_pipeline, summary_line
    from mgtq.utils import write_json

    pipe = _load_pipe(args)
    result = evaluate_pipeline(pipe, limit=args.limit, sampler=_sampler(args, pipe), batch_size=args.batch_size,
                               progress=not args.no_progress, split=args.split)
    result.pop("tokens")
    print(summary_line(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_calibrate(args) -> int:
    from mgtq.scq.calibrate import calibrate

    recipe = args.recipe or Path(__file__).resolve().parent.parent / "recipes" / "tiny-shapes-w4a8-scq.yaml"
    out = args.out or Path("calibration") / Path(recipe).stem
    report = calibrate(recipe, out, progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under accelerate/torchrun every process gets here
        print(json.dumps(report, indent=2))
        print(f"calibration run in {out}; export it with: mgtq export {out} --out checkpoints/<name>")
    return 0


def cmd_export(args) -> int:
    from mgtq.export import export_run

    out = export_run(args.run, args.out)
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from mgtq.bench import BenchConfig, MeasureSettings, run_bench, to_markdown
    from mgtq.bench.peers import PEERS

    both = not (args.memory or args.latency)  # neither flag: measure both
    peers = () if args.peers is None else tuple(PEERS) if args.peers == "all" else _csv(args.peers)
    config = BenchConfig(
        model=str(args.model), formats=_csv(args.formats), tome=tuple(float(t) for t in _csv(args.tome)),
        tome_blocks=_csv(args.tome_blocks), offload=args.offload, compile=args.compile, peers=peers,
        threads=args.threads, isolation=args.isolation,
        json=str(args.json) if args.json else None, device=args.device, seed=args.seed,
        measure=MeasureSettings(warmup=args.warmup, repeats=args.repeats, steps=args.steps, budget_s=args.budget,
                                profile=args.profile, latency=both or args.latency, memory=both or args.memory),
    )
    print(to_markdown(run_bench(config, progress=not args.no_progress)))
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgtq", description="Compress and run masked generative transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    _add_model_args(g)
    _add_sampler_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--out", type=Path, default=Path("mgtq-out.png"),
                   help="PNG path; with several images, NAME-0.png, NAME-1.png … (or a folder)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="score a model on ShapeBench (generated pixels, per category)")
    _add_model_args(e)
    _add_sampler_args(e)
    e.add_argument("--limit", type=int, default=None, help="only the first N prompts (balanced over categories)")
    # The names of mgtq.shapes.bench.SPLITS, written out: importing it would slow every CLI start-up.
    e.add_argument("--split", choices=("test", "val"), default="test",
                   help="test = ShapeBench (report this); val = disjoint prompts for choosing settings")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--json", type=Path, default=None, help="write the full result as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="SCQ: synthesize → W4 QAT → magnitudes → secondary A8 calibration")
    c.add_argument("--recipe", type=Path, default=None, help="recipe YAML (default: recipes/tiny-shapes-w4a8-scq.yaml)")
    c.add_argument("--out", type=Path, default=None, help="run folder (default: calibration/<recipe name>)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    x = sub.add_parser("export", help="export a calibration run to a packed W4A8 checkpoint")
    x.add_argument("run", type=Path, help="calibration run folder")
    x.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="memory and latency of every format × TomeMGT × offloading, beside peers")
    b.add_argument("--memory", action="store_true", help="measure memory (default: memory and latency)")
    b.add_argument("--latency", action="store_true", help="measure latency (default: memory and latency)")
    b.add_argument("--model", default="tiny-shapes",
                   help="tiny-shapes (embedded default), meissonic-1024 (random weights, full size) or a pipeline DIR")
    b.add_argument("--formats", default="fp32,bf16,w4a16,w4a8,scq",
                   help="comma list of fp32,bf16,w4a16,w4a8,scq (opt-in: w4a8-cached, scq-cached)")
    b.add_argument("--tome", default="0", help="comma list of TomeMGT ratios, e.g. 0,0.5 (0 = no merging)")
    b.add_argument("--tome-blocks", default="joint",
                   help="comma list of blocks TomeMGT merges in: joint (paper), single, all; each ratio > 0 per set")
    b.add_argument("--offload", action="store_true", help="also run each format in the CPU-offloading mode")
    b.add_argument("--compile", action="store_true",
                   help="also run each format with the transformer under torch.compile(fullgraph=True)")
    b.add_argument("--peers", nargs="?", const="all", default=None,
                   help="run optimum-quanto / torchao beside mgtq: all (bare flag) or a comma list of names")
    b.add_argument("--json", type=Path, default=None,
                   help="JSON output (default benchmarks/results/bench_<model>.json; .md and .png beside it)")
    b.add_argument("--repeats", type=int, default=3, help="timed transformer forwards per config")
    b.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing")
    b.add_argument("--steps", type=int, default=2, help="sampler steps of the timed whole-image run")
    b.add_argument("--budget", type=float, default=None, help="stop timing a config's forwards after S seconds")
    b.add_argument("--threads", type=int, default=None, help="torch threads per config (default: all cores)")
    b.add_argument("--profile", action="store_true", help="also profile one forward per config (time split)")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--isolation", choices=["forkserver", "spawn", "none"], default="forkserver",
                   help="one fresh process per config (forkserver, spawn) or none (fast, memory not per config)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, FloatingPointError) as err:
        print(f"mgtq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
