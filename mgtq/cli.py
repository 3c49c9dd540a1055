"""`mgtq` command line: a thin layer, each command is one call into the Python API."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from collections.abc import Collection
from pathlib import Path

from mgtq import argtypes
from mgtq.limits import MAX_GUIDANCE, MAX_IMAGES, MAX_RESOLUTION, MAX_STEPS


# Each command's one-line help (`mgtq --help` lists them) in its order; _ADD_ARGUMENTS adds its flags.
_HELP = {
    "generate": "generate images from a prompt",
    "edit": "inpaint (--mask), outpaint (--outpaint) or re-draw (--strength) an image from a prompt",
    "eval": "score a model on ShapeBench (generated pixels, per category)",
    "calibrate": "SCQ: synthesize → W4 QAT → magnitudes → secondary A8 calibration",
    "quantize": "post-training quantization (no QAT, minutes) of a pipeline into a checkpoint",
    "export": "export a calibration run to a packed W4A8 checkpoint",
    "bench": "memory and latency of every format × TomeMGT × offloading (with a checkout: beside peers)",
    "cache": "list mgtq's compile cache (what --compile keeps for a later run), or remove it",
}
COMMANDS = tuple(_HELP)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from mgtq.dtypes import SHORT_DTYPES

    p.add_argument("--model", type=argtypes.pipeline_folder, default=None,
                   help="pipeline folder or embedded model name (default: the embedded tiny-shapes model; "
                        "also tiny-shapes-16x16)")
    p.add_argument("--text-encoder", type=argtypes.existing_folder("text encoder"), default=None,
                   help="separate CLIP text encoder folder (the official Meissonic setup keeps it apart)")
    p.add_argument("--device", type=argtypes.device, default=None,
                   help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", choices=SHORT_DTYPES, default=None,
                   help="transformer/text encoder dtype (default: as saved)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (fullgraph; the first step pays the compile time)")
    p.add_argument("--threads", type=argtypes.integer(minimum=1), default=None,
                   help="CPU threads torch may use (default: torch's choice, all cores)")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    from mgtq.merging.patch import BLOCK_SET_NAMES
    from mgtq.sampling.cli_args import add_sampler_arguments

    p.add_argument("--steps", type=argtypes.integer(minimum=1, maximum=MAX_STEPS), default=None,
                   help=f"sampling steps, at most {MAX_STEPS} (default: the model's)")
    p.add_argument("--cfg", type=argtypes.number(minimum=0, maximum=MAX_GUIDANCE), default=None,
                   help=f"classifier-free guidance scale, at most {MAX_GUIDANCE:g} (default: the model's)")
    add_sampler_arguments(p)
    p.add_argument("--tome", type=argtypes.ratio, default=None, metavar="RATIO",
                   help="TomeMGT token merging: merge this fraction of image tokens per block (default: 0, off)")
    p.add_argument("--tome-blocks", choices=BLOCK_SET_NAMES, default="joint",
                   help="blocks that merge (joint = multi-modal blocks, the paper's setting)")
    _add_tome_option_args(p)


def _add_tome_option_args(p: argparse.ArgumentParser) -> None:
    """TomeConfig's other fields as flags (unset = its default, said in the help). Their values are checked
    here, as TomeConfig checks them, so a bad one is refused before the model loads, naming the flag."""
    from typing import get_args

    from mgtq.merging import TomeConfig
    from mgtq.merging.patch import MergeSchedule, Sources
    from mgtq.merging.tome import LOCALITIES

    d = TomeConfig()
    p.add_argument("--tome-locality", choices=LOCALITIES, default=None,
                   help=f"TomeMGT: where a source may merge: cell, window or global (default: {d.locality})")
    p.add_argument("--tome-window", type=argtypes.integer(minimum=3, parity="odd"), default=None,
                   help=f"TomeMGT: window side for --tome-locality window, odd (default: {d.window})")
    p.add_argument("--tome-sources", choices=get_args(Sources), default=None,
                   help="TomeMGT: tokens that may merge away: all, decoded, masked or decoded-first "
                        f"(default: {d.sources})")
    p.add_argument("--tome-schedule", choices=get_args(MergeSchedule), default=None,
                   help="TomeMGT: ratio over sampling by the masked fraction σ: constant, decoded (·(1−σ)) or "
                        f"masked (·σ) (default: {d.schedule})")
    p.add_argument("--tome-mlp", action="store_true", default=None,
                   help="TomeMGT: also merge before the MLP of joint blocks (the official code)")
    p.add_argument("--tome-proportional", action=argparse.BooleanOptionalAction, default=None,
                   help="TomeMGT: proportional attention (a merged token's keys weigh as many tokens as it replaced; "
                        f"default: {'on' if d.proportional_attention else 'off'})")


def _tome_options(args) -> dict:
    names = {"tome_locality": "locality", "tome_window": "window", "tome_sources": "sources",
             "tome_schedule": "schedule", "tome_mlp": "merge_mlp",
             "tome_proportional": "proportional_attention"}
    return {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag, None) is not None}


def _sampler(args, pipe):
    """The checkpoint's sampler settings, then the preset/trick flags, then --steps/--cfg."""
    from mgtq.sampling.cli_args import sampler_config_from_args

    return sampler_config_from_args(args, pipe.settings.sampler, num_steps=args.steps, guidance_scale=args.cfg)


def _load_pipe(args):
    import torch

    from mgtq.default_model import default_model
    from mgtq.pipeline import load

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load(args.model or default_model(), text_encoder=args.text_encoder, torch_dtype=args.dtype, device=device,
                progress=not getattr(args, "no_progress", False))
    if getattr(args, "tome", None):
        from mgtq.merging import apply_tomemgt

        apply_tomemgt(pipe, args.tome, blocks=args.tome_blocks, **_tome_options(args))
    if args.compile:
        pipe.compile()
    return pipe


def _prompts_file(path: Path) -> list[str]:
    """--prompts FILE: one prompt per line; blank lines are skipped, an empty file is an error."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text; give a text file with one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt; write one prompt per line")
    return prompts


def cmd_generate(args) -> int:
    from mgtq.generate import generate_to_files, output_paths

    prompts = _prompts_file(args.prompts) if args.prompts else [args.prompt]
    for path in output_paths(args.out, args.num_images * len(prompts)):
        _check_output_path(path, "--out")
    pipe = _load_pipe(args)
    generate_to_files(
        pipe, prompts if args.prompts else args.prompt, out=args.out, negative_prompt=args.negative_prompt,
        seed=args.seed, height=args.height, width=args.width, num_images=args.num_images,
        progress=not args.no_progress, sampler=_sampler(args, pipe), batch_size=args.batch_size,
        on_write=lambda path: print(path, flush=True),  # each as it is written: a Ctrl-C later leaves the list
    )
    return 0


def cmd_edit(args) -> int:
    from mgtq.generate import output_paths

    out = output_paths(args.out, 1)[0]  # generate's --out rule: a .png path or a folder, never x.jpg
    _check_output_path(out, "--out")
    from mgtq.editing import check_edit_files, edit_to_file

    check_edit_files(args.image, mask=args.mask, outpaint=args.outpaint, tile=_model_tile(args.model), out=out)
    pipe = _load_pipe(args)
    out = edit_to_file(pipe, args.image, args.prompt, out, mask=args.mask, outpaint=args.outpaint,
                       strength=args.strength, seed=args.seed, negative_prompt=args.negative_prompt,
                       progress=not args.no_progress, sampler=_sampler(args, pipe))
    print(out)
    return 0


def _model_tile(model: Path | None) -> int | None:
    """Pixels per token side of the model (VQ factor × the transformer's feature compression), from its config
    files alone, so `mgtq edit` can check the image's size before the weights load; None when they do not read
    (loading the model then says why)."""
    from mgtq.default_model import default_model
    from mgtq.pipeline import folder_pixels_per_token

    try:
        return folder_pixels_per_token(model or default_model())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _outpaint_padding(text: str) -> tuple[int, int, int, int]:
    """'L,R,T,B': four whole pixel counts ≥ 0 (argparse type of `mgtq edit --outpaint`)."""
    pads = argtypes.comma_list(argtypes.integer(minimum=0))(text)
    if len(pads) != 4:
        raise argparse.ArgumentTypeError(f"takes L,R,T,B: four pixel counts ≥ 0 (left, right, top, bottom), "
                                         f"got {text!r}")
    return pads


def cmd_eval(args) -> int:
    if args.json:
        _check_output_path(args.json, "--json")  # now, not after the whole evaluation
    from mgtq.evaluation import edit_summary_line, evaluate_editing, evaluate_pipeline, summary_line
    from mgtq.files import write_json
    from mgtq.quantization.kernels import kernels_label
    from mgtq.shapes.edit import EDIT_TASKS

    pipe = _load_pipe(args)
    common = dict(limit=args.limit, sampler=_sampler(args, pipe), batch_size=args.batch_size,
                  progress=not args.no_progress, split=args.split)
    if args.task == "shapebench":
        result = evaluate_pipeline(pipe, **common)
        result.pop("tokens")
        lines = [summary_line(result)]
    else:
        tasks = EDIT_TASKS if args.task == "all" else (args.task,)
        result = {"tasks": {task: evaluate_editing(pipe, task, **common) for task in tasks}}
        done = list(result["tasks"].values())
        lines = [edit_summary_line(task_result) for task_result in done]
        lines.append(f"  on {kernels_label(done[-1]['kernels'])}")  # one pipeline: the same for every task
    if args.json:  # before any print: one that fails (a closed pipe) must not lose the whole evaluation
        write_json(args.json, result)
        lines.append(f"wrote {args.json}")
    print("\n".join(lines))
    return 0


def cmd_calibrate(args) -> int:
    from mgtq.default_model import DEFAULT_RECIPE

    recipe = args.recipe or DEFAULT_RECIPE
    out = args.out or Path("calibration") / Path(recipe).stem
    _check_output_path(out, "--out", folder=True)
    from mgtq.scq.calibrate import calibrate

    report = calibrate(recipe, out, progress=not args.no_progress, restart=args.restart)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under accelerate/torchrun every process gets here
        print(json.dumps(report, indent=2))
        print(f"calibration run in {out}; export it with: mgtq export {out} --out checkpoints/<name>")
    return 0


def cmd_export(args) -> int:
    from mgtq.export import export_run

    out = export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_quantize(args) -> int:
    from mgtq.default_model import default_model
    from mgtq.ptq import calibration_prompts, config_from_name, quantize_pipeline

    config = config_from_name(args.config, args.group_size)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prompts = calibration_prompts(args.calibration_prompts) if args.config != "w4a16" else None
    done = quantize_pipeline(args.model or default_model(), config, args.out, prompts, overwrite=args.overwrite,
                             progress=not args.no_progress, text_encoder=args.text_encoder,
                             torch_dtype=args.dtype or "auto")
    counts = {kind: list(done.values()).count(kind) for kind in sorted(set(done.values()))}
    print(f"wrote {args.out} ({', '.join(f'{n} {kind}' for kind, n in counts.items())})")
    return 0


def cmd_cache(args) -> int:
    import time

    from mgtq.compilation import cache_dir, cache_entries, clear_cache

    if args.unused_days is not None and not args.clear:
        raise ValueError("--unused-days says which folders --clear removes; add --clear")
    if args.clear:
        removed = clear_cache(args.unused_days)
        print(f"removed {len(removed)} folder(s), {sum(e.size for e in removed) / 2**20:.1f} MiB, from {cache_dir()}")
        return 0
    entries = cache_entries()
    print(f"{cache_dir()}: {sum(e.size for e in entries) / 2**20:.1f} MiB in {len(entries)} folder(s)")
    for e in entries:
        used = time.strftime("%Y-%m-%d", time.localtime(e.last_used))
        print(f"  {e.kind:<11} {e.size / 2**20:9.1f} MiB  last used {used}  {e.path}")
    return 0


def cmd_bench(args) -> int:
    if args.json:
        _check_output_path(args.json, "--json")
    from mgtq.bench import BenchConfig, MeasureSettings, run_bench, to_markdown

    both = not (args.memory or args.latency)  # neither flag: measure both
    peers = () if args.peers is None else _csv(args.peers)
    if args.peers == "all":
        from mgtq.bench.lab import load_lab

        peers = tuple(load_lab("peers").PEERS)
    if args.profile:  # each case process loads it; a missing checkout is said now, before any case runs
        from mgtq.bench.lab import load_lab

        load_lab("profile")
    plot = None
    if args.plot:
        from mgtq.bench.lab import load_lab

        plot = load_lab("plot")  # now, before the run: it needs a checkout
    config = BenchConfig(
        model=str(args.model), text_encoder=None if args.text_encoder is None else str(args.text_encoder),
        formats=_csv(args.formats), tome=args.tome, tome_blocks=_csv(args.tome_blocks),
        tome_options=_tome_options(args), offload=args.offload, compile=args.compile, peers=peers,
        threads=args.threads, isolation=args.isolation,
        json=str(args.json) if args.json else None, device=args.device, seed=args.seed,
        measure=MeasureSettings(warmup=args.warmup, repeats=args.repeats, steps=args.steps, sampler=args.sampler,
                                reuse=_bench_reuse(args), budget_s=args.budget, profile=args.profile,
                                latency=both or args.latency, memory=both or args.memory,
                                interleave=not args.sequential),
    )
    report = run_bench(config, log=(lambda message: None) if args.no_progress else print)
    if plot is not None:
        from mgtq.bench.source import resolve_model

        png = config.output_paths(resolve_model(config.model, config.text_encoder).slug)["json"].with_suffix(".png")
        plot.write_png(report, png)
        print(f"wrote {png}")
    print(to_markdown(report))
    failed = [r["label"] for r in report["results"] if r.get("status") == "failed"]
    if failed:  # the report is written (the other cases' figures stand); the exit code says it is incomplete
        print(f"mgtq bench: error: {len(failed)} case(s) failed ({', '.join(failed)}); see Skipped above for why",
              file=sys.stderr)
        return 2
    return 0


def _bench_reuse(args):
    """The whole image's ReuseConfig from the --reuse-* flags, on top of --sampler's (None: no flag given)."""
    from mgtq.reuse.config import ReuseConfig
    from mgtq.sampling import SamplerConfig
    from mgtq.sampling.cli_args import reuse_from_args

    return reuse_from_args(args, SamplerConfig.preset(args.sampler).reuse if args.sampler else ReuseConfig())


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _check_output_path(path: Path, flag: str, folder: bool = False) -> None:
    """Fail now, before any long work, if `path` (a file, or a folder when `folder`) cannot be written.

    Every file mgtq writes goes through a temporary sibling and a rename, so what must be writable
    is the nearest existing folder above `path` (and `path` itself, for a folder that is written into).
    """
    from mgtq.files import existing_parent, writable_file

    path = Path(path)
    if path.is_dir() and not folder:
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file path")
    if not folder:
        try:
            path = writable_file(path)  # a device or FIFO is refused; a symlink is written through
        except ValueError as err:
            raise ValueError(f"{flag} {err}") from None
    if path.exists() and not path.is_dir() and folder:
        raise NotADirectoryError(f"{flag} {path} is a file; give a folder path")
    try:
        parent = existing_parent(path.absolute())
    except ValueError as err:
        raise ValueError(f"{flag} {path}: {err}") from None
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a folder")
    for where in [parent] + ([path] if folder and path.is_dir() else []):
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {path}: no permission to write in {where}; choose another path")


_WINDOWS = os.name == "nt"


def describe_error(err: BaseException) -> str:
    """One line for an expected failure: our own messages as they are, OS errors with what to do."""
    if isinstance(err, OSError) and err.strerror:  # raised by the OS, not by mgtq with a message
        where = f"{err.filename}: " if err.filename else ""
        # Windows refuses a file another program has open (an image viewer, a loaded model) with the same errors
        refused = "; " + ("close the program using it, check its permissions," if _WINDOWS else
                          "check its permissions") + " or choose another path"
        hint = {errno.EACCES: refused,
                errno.EPERM: refused,
                errno.ENOSPC: "; free some space and rerun",
                errno.EROFS: "; choose a path on a writable disk",
                errno.ENOTDIR: " (a part of the path is a file)",
                errno.EISDIR: " (a file was expected)"}.get(err.errno, "")
        text = f"{where}{err.strerror.lower()}{hint}"
    elif isinstance(err, ImportError):
        text = f"a package mgtq needs did not import ({err}); {_reinstall_hint(err)}"
    elif _out_of_memory(err):
        first = (str(err).splitlines() or [""])[0]
        text = f"out of memory{f' ({first})' if first else ''}; try a smaller --batch-size / image size, or free memory"
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _reinstall_hint(err: ImportError) -> str:
    """What to install for a failed import: the distribution that provides the missing module (PIL is pillow's),
    else a reinstall of what the message names (a package that imports but refuses its neighbour's version)."""
    from importlib.metadata import packages_distributions

    top = (err.name or "").partition(".")[0]
    if not top:
        return "install the versions it asks for (pip install -U ...), or rerun with --debug to see where"
    dist = (packages_distributions().get(top) or [top])[0]
    return f"pip install -U {dist.lower()}"  # pip's names are case-blind; Pillow's metadata spelled it "Pillow"


def _own_import_failed(err: BaseException) -> bool:
    # mgtq's own module missing is a broken install or a bug, not the user's environment: keep the traceback.
    return isinstance(err, ImportError) and (err.name or "").partition(".")[0] == "mgtq"


def _out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or (isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)))


# Failures a user can cause and fix (bad input, files, devices, memory, a broken package); anything else is a bug
# and keeps its traceback.
_EXPECTED = (OSError, ValueError, FloatingPointError, MemoryError, ImportError)
_STOPPED = {"calibrate": "stopped; rerun the same command to resume"}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block would bury the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _recipe(text: str) -> Path:
    """--recipe: a file (argtypes' checks) or a shipped recipe's name."""
    from mgtq.default_model import recipe_file

    if Path(text).exists():
        return argtypes.existing_file("recipe")(text)
    try:
        return recipe_file(text)
    except FileNotFoundError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty; describe the image, e.g. --prompt \"a red circle\"")
    return _utf8(text)


def _negative_prompt(text: str) -> str:
    """--negative-prompt: any UTF-8 text, the empty one included (unlike --prompt)."""
    return _utf8(text)


def _utf8(text: str) -> str:
    """Python reads argv bytes that are not UTF-8 as lone surrogates, which the tokenizer fails on after the
    model has loaded: refused now, as `--prompts FILE` refuses a file that is not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not UTF-8 text (the command line held bytes in another encoding); "
                                         "give it in UTF-8") from None
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each flag's help, except where the help says its default in words ("the
    model's", "cuda if available") and where X is None or False: an unset option or a switch that is off (what
    an unset flag keeps is said in its help or its group's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "(default" in help or action.default is None or action.default is False:
            return help
        return super()._get_help_string(action)


def build_parser(commands: Collection[str] = COMMANDS) -> argparse.ArgumentParser:
    """The whole command line; `commands`: those whose flags are added (the others are listed, without flags).
    main adds only the command it runs: the flags' choices come from modules that import torch (seconds), which
    `mgtq --help`, `mgtq --version` and a mistyped command do not need."""
    from mgtq import __version__

    parser = _Parser(prog="mgtq", description="Compress and run masked generative transformers.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"mgtq {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    # --debug is also accepted after the command; SUPPRESS keeps `mgtq --debug CMD` from being reset.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices  # each command's own parser: main's checks report errors through it

    for name, help in _HELP.items():
        command = sub.add_parser(name, help=help, description=help, parents=[debug], formatter_class=_HelpFormatter)
        if name in commands:
            _ADD_ARGUMENTS[name](command)
    return parser


def _add_generate_arguments(g: argparse.ArgumentParser) -> None:
    _add_model_args(g)
    _add_sampler_args(g)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", type=_prompt, help="what the image shows")
    what.add_argument("--prompts", type=argtypes.existing_file("prompts"), metavar="FILE",
                      help="a text file with one prompt per line (blank lines skipped): one batch run")
    g.add_argument("--negative-prompt", type=_negative_prompt, default=None,
                   help="what the image should not show (the CFG's other branch)")
    g.add_argument("--seed", type=argtypes.seed, default=0,
                   help="seed of the first image; image i uses seed + i (the same image again at the same "
                        "--batch-size)")
    g.add_argument("--height", type=argtypes.integer(minimum=1, maximum=MAX_RESOLUTION), default=None,
                   help=f"pixels, at most {MAX_RESOLUTION} (default: the model's resolution)")
    g.add_argument("--width", type=argtypes.integer(minimum=1, maximum=MAX_RESOLUTION), default=None,
                   help=f"pixels, at most {MAX_RESOLUTION} (default: the model's resolution)")
    g.add_argument("--num-images", type=argtypes.integer(minimum=1, maximum=MAX_IMAGES), default=1,
                   help=f"images per prompt, sampled as one batch, at most {MAX_IMAGES}")
    g.add_argument("--batch-size", type=argtypes.integer(minimum=1), default=8,
                   help="prompts per sampler batch (with --prompts)")
    g.add_argument("--out", type=Path, default=Path("mgtq-out.png"),
                   help="PNG path; with several images, NAME-0.png, NAME-1.png … (or a folder), prompt-major")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars (sampling and weight loading)")
    g.set_defaults(func=cmd_generate)


def _add_edit_arguments(d: argparse.ArgumentParser) -> None:
    _add_model_args(d)
    _add_sampler_args(d)
    d.add_argument("--image", type=argtypes.existing_file("image"), required=True,
                   help="image to edit: RGB (an RGBA one without transparent pixels reads as RGB)")
    how = d.add_mutually_exclusive_group()
    how.add_argument("--mask", type=argtypes.existing_file("mask"), default=None,
                     help="inpainting: mask image of the same size, white = repaint")
    how.add_argument("--outpaint", type=_outpaint_padding, default=None, metavar="L,R,T,B",
                     help="outpainting: pixels to add on the left, right, top and bottom")
    d.add_argument("--strength", type=argtypes.number(0, 1, above=True), default=None,
                   help="the share of the steps run, as in diffusers (0.5: the last half), in (0, 1]; alone: "
                        "img2img from the image; with --mask or --outpaint: the inpainting's (default 1)")
    d.add_argument("--prompt", type=_prompt, required=True, help="what the edited image shows")
    d.add_argument("--negative-prompt", type=_negative_prompt, default=None,
                   help="what the image should not show (the CFG's other branch)")
    d.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the edit (the same seed, the same image)")
    d.add_argument("--out", type=Path, default=Path("mgtq-edit.png"),
                   help="PNG path, or a folder (the image is then 0.png in it), as generate's --out")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    d.set_defaults(func=cmd_edit)


def _add_eval_arguments(e: argparse.ArgumentParser) -> None:
    from mgtq.shapes.edit import EDIT_TASKS
    from mgtq.shapes.shapebench import SPLITS

    _add_model_args(e)
    _add_sampler_args(e)
    e.add_argument("--limit", type=argtypes.integer(minimum=1), default=None,
                   help="only the first N prompts (balanced over categories; per task with --task; default: all)")
    e.add_argument("--split", choices=tuple(SPLITS), default="test",
                   help="test = ShapeBench (report this); val = other seeds and scenes (captions repeat), for "
                        "choosing settings")
    e.add_argument("--task", choices=("shapebench", *EDIT_TASKS, "all"), default="shapebench",
                   help="shapebench = text-to-image ShapeBench; inpaint, replace, outpaint, img2img = a "
                        "ShapeBench-Edit task; all = the four editing tasks")
    e.add_argument("--batch-size", type=argtypes.integer(minimum=1), default=16, help="prompts per sampler batch")
    e.add_argument("--json", type=Path, default=None, help="write the full result as JSON")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bars (sampling and weight loading)")
    e.set_defaults(func=cmd_eval)


def _add_calibrate_arguments(c: argparse.ArgumentParser) -> None:
    from mgtq.default_model import RECIPES, shipped_recipes

    c.add_argument("--recipe", type=_recipe, default=None,
                   help="recipe YAML file, or a shipped recipe's name: " + ", ".join(shipped_recipes())
                        + f" (the files in {RECIPES}; default: tiny-shapes-w4a8-scq, the embedded model's)")
    c.add_argument("--out", type=Path, default=None, help="run folder (default: calibration/<recipe name>)")
    c.add_argument("--restart", action="store_true",
                   help="let an existing run folder take this recipe (stages whose inputs changed run again)")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    c.set_defaults(func=cmd_calibrate)


def _add_quantize_arguments(q: argparse.ArgumentParser) -> None:
    from mgtq.quantization.api import CONFIGS
    from mgtq.dtypes import SHORT_DTYPES

    q.add_argument("--model", type=argtypes.pipeline_folder, default=None,
                   help="float pipeline folder or embedded model name (default: the embedded tiny-shapes model)")
    q.add_argument("--text-encoder", type=argtypes.existing_folder("text encoder"), default=None,
                   help="separate CLIP text encoder folder (the official Meissonic setup keeps it apart)")
    q.add_argument("--config", choices=tuple(CONFIGS), required=True,
                   help="w4a16: int4 weights; w4a8: + int8 activations everywhere; scq: int8 activations on the "
                        "lowest-magnitude third only")
    q.add_argument("--group-size", type=argtypes.integer(minimum=2, parity="even"), default=None,
                   help="input columns per int4 scale of the A16 layers: an even number such as 32, 64 or 128 "
                        "(default: one scale per output channel)")
    q.add_argument("--calibration-prompts", type=argtypes.integer(minimum=1), default=32,
                   help="ShapeBench val prompts that calibrate int8 activation scales (w4a8, scq)")
    q.add_argument("--dtype", choices=SHORT_DTYPES, default=None,
                   help="float dtype of the non-quantized parts (default: as saved)")
    q.add_argument("--threads", type=argtypes.integer(minimum=1), default=None,
                   help="CPU threads torch may use (default: torch's choice, all cores)")
    q.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (a new path)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it is an existing mgtq checkpoint")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    q.set_defaults(func=cmd_quantize)


def _add_export_arguments(x: argparse.ArgumentParser) -> None:
    x.add_argument("run", type=argtypes.existing_folder("calibration run"), help="calibration run folder")
    x.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (a new path)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it is an existing mgtq checkpoint")
    x.set_defaults(func=cmd_export)


def _add_bench_arguments(b: argparse.ArgumentParser) -> None:
    from mgtq.bench.config import ISOLATIONS
    from mgtq.bench.formats import DEFAULT_FORMATS, HELP as FORMATS_HELP
    from mgtq.sampling.cli_args import add_preset_argument, add_reuse_arguments

    lab = "needs a checkout of mgtq's repository (benchmarks/)"
    b.add_argument("--memory", action="store_true", help="measure memory (default: memory and latency)")
    b.add_argument("--latency", action="store_true", help="measure latency (default: memory and latency)")
    b.add_argument("--model", default="tiny-shapes",
                   help="tiny-shapes or tiny-shapes-16x16 (embedded), meissonic-1024 (random "
                        "weights, full size) or a pipeline DIR")
    b.add_argument("--text-encoder", type=argtypes.existing_folder("text encoder"), default=None,
                   help="separate CLIP text encoder folder for a pipeline DIR (the official Meissonic setup)")
    b.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=FORMATS_HELP)
    b.add_argument("--tome", type=argtypes.comma_list(argtypes.ratio), default="0",
                   help="comma list of TomeMGT ratios, e.g. 0,0.5 (0 = no merging)")
    b.add_argument("--tome-blocks", default="joint",
                   help="comma list of blocks TomeMGT merges in: joint (paper), single, all; each ratio > 0 per set")
    _add_tome_option_args(b)
    b.add_argument("--offload", action="store_true", help="also run each format in the CPU-offloading mode")
    b.add_argument("--compile", action="store_true",
                   help="also run each format (and peer) with the transformer under torch.compile(fullgraph=True)")
    b.add_argument("--peers", nargs="?", const="all", default=None,
                   help=f"run optimum-quanto / torchao beside mgtq: all (bare flag) or a comma list of names; {lab} "
                        "and optimum-quanto (pip install -e '.[bench]')")
    b.add_argument("--json", type=Path, default=None,
                   help="JSON output (default bench_<model>.json in the working folder; the .md beside it)")
    b.add_argument("--plot", action="store_true", help=f"also write a PNG chart beside the JSON; {lab}")
    b.add_argument("--repeats", type=argtypes.integer(minimum=1), default=5,
                   help="timed transformer forwards per config: one per interleaved round (see --sequential)")
    b.add_argument("--sequential", action="store_true",
                   help="time each config's forwards in a row, one config after another (default: interleaved "
                        "rounds A B C … A B C …, every config held in memory at once)")
    b.add_argument("--warmup", type=argtypes.integer(minimum=0), default=1, help="untimed forwards before timing")
    b.add_argument("--steps", type=argtypes.integer(minimum=1), default=2,
                   help="sampler steps of the timed whole-image run")
    image = b.add_argument_group("whole image", "the sampler of the timed whole image (forwards stay plain full "
                                                "forwards)")
    add_preset_argument(image)
    add_reuse_arguments(image)
    b.add_argument("--budget", type=argtypes.number(minimum=0, above=True), default=None,
                   help="stop timing a config's forwards after S seconds (default: no limit, every repeat)")
    b.add_argument("--threads", type=argtypes.integer(minimum=1), default=None,
                   help="torch threads per config (default: all cores)")
    b.add_argument("--profile", action="store_true",
                   help=f"also profile one forward per config (time split by operator category); {lab}")
    b.add_argument("--device", type=argtypes.device, default="cpu", help="cpu or cuda[:i]")
    b.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the timed whole-image run")
    b.add_argument("--isolation", choices=ISOLATIONS, default="spawn",
                   help="one fresh process per config (spawn) or none (fast, memory not per config); forkserver is "
                        "deprecated and runs as spawn")
    b.add_argument("--no-progress", action="store_true", help="hide the per-config progress lines")
    b.set_defaults(func=cmd_bench)


def _add_cache_arguments(k: argparse.ArgumentParser) -> None:
    k.add_argument("--clear", action="store_true", help="remove the cache's folders (all, or see --unused-days)")
    k.add_argument("--unused-days", type=argtypes.number(0), default=None, metavar="DAYS",
                   help="with --clear: only the folders no run used for DAYS days (default: every folder)")
    k.set_defaults(func=cmd_cache)


_ADD_ARGUMENTS = {"generate": _add_generate_arguments, "edit": _add_edit_arguments, "eval": _add_eval_arguments,
                  "calibrate": _add_calibrate_arguments, "quantize": _add_quantize_arguments,
                  "export": _add_export_arguments, "bench": _add_bench_arguments, "cache": _add_cache_arguments}


def _check_tome_flags(command: argparse.ArgumentParser, args) -> None:
    """TomeMGT's option flags without --tome would be ignored: an error instead (generate, edit, eval).
    `command`: the subcommand's parser, whose errors name it ("mgtq generate: error: … (see mgtq generate
    --help)")."""
    if args.command == "bench" or getattr(args, "tome", None) or not _tome_options(args):
        return
    flags = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(_tome_options_flags(args)))
    command.error(f"{flags}: TomeMGT's options apply only with --tome RATIO; add --tome 0.5, say")


def _check_edit_flags(command: argparse.ArgumentParser, args) -> None:
    """`mgtq edit` needs --mask, --outpaint or --strength (argparse's groups cannot say "at least one of")."""
    if args.command == "edit" and args.mask is None and args.outpaint is None and args.strength is None:
        command.error("give --mask (inpaint), --outpaint L,R,T,B or --strength alone (img2img)")


def _tome_options_flags(args) -> list[str]:
    return [k for k in vars(args) if k.startswith("tome_") and k != "tome_blocks" and getattr(args, k) is not None]


def main(argv: list[str] | None = None) -> int:
    """Run one command; every expected failure is one line on stderr and a non-zero exit code, and a Ctrl-C is
    one line and exit code 130 at any moment, also while the parser is built (its imports take seconds)."""
    _tolerant_output(sys.stdout)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, running = None, False
    try:
        parser = build_parser(commands=[c for c in [_command_word(argv)] if c in COMMANDS])
        try:
            args = parser.parse_args(argv)
            _check_tome_flags(parser.commands[args.command], args)
            _check_edit_flags(parser.commands[args.command], args)
        except SystemExit as stop:  # argparse printed --help or its one-line error
            return stop.code
        running = True
        return _run(args)
    except KeyboardInterrupt:
        return _stopped(args, argv, running)


def _tolerant_output(stream) -> None:
    """Let `stream` print what its encoding lacks as "?" rather than fail: a redirected stdout on Windows encodes in
    the ANSI code page (cp1252, …) strictly, and help and summaries hold "→", "σ", "≤". A UTF-8 stream, or one
    whose error handling was chosen (PYTHONIOENCODING=…:backslashreplace), is left as it is."""
    import codecs

    encoding, reconfigure = getattr(stream, "encoding", None), getattr(stream, "reconfigure", None)
    if not encoding or reconfigure is None or getattr(stream, "errors", "strict") != "strict":
        return
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return
    if not name.startswith("utf"):
        reconfigure(errors="replace")


def _command_word(argv: list[str]) -> str | None:
    """The command a command line runs, before it is parsed: its first word that is not an option (mgtq's own
    options, --debug, --help and --version, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _stopped(args, argv: list[str], running: bool) -> int:
    """Ctrl-C: "mgtq CMD: stopped" (calibrate's says how to resume), exit code 130 as a shell's; before the
    command line is parsed, its first word that is not an option names the command, if it is one."""
    if args.debug if args is not None else "--debug" in argv:
        traceback.print_exc()
    command = args.command if args is not None else _command_word(argv)
    command = command if command in COMMANDS else None
    what = _STOPPED.get(command, "stopped") if running else "stopped"
    print(f"mgtq{f' {command}' if command else ''}: {what}", file=sys.stderr)
    return 130


def _run(args) -> int:
    try:
        return args.func(args)
    except (*_EXPECTED, RuntimeError) as err:
        if (isinstance(err, RuntimeError) and not _out_of_memory(err)) or _own_import_failed(err):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"mgtq {args.command}: error: {describe_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
