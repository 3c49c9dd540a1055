"""How long `mgtq.load` takes, and what its integrity checks cost in it.

    python benchmarks/bench_load.py --model meissonic-1024 --formats scq,bf16 --rounds 5 --threads 1

Per format, a pipeline folder is built once (random weights; cached in --work): the transformer of
`--model` in that format, the preset's VQ, and a text encoder of CLIP-ViT-H-14's text-tower shape in fp16
(24 layers, width 1024, Meissonic's `text_encoder`; its vocabulary is the embedded tokenizer's, so it holds
about 300M of the real one's 354M parameters). Then, in `--rounds` interleaved rounds (A B A B …), a fresh
process per format does what a user's script does, `mgtq.load(folder)`, timed, and then, on the files and
tensors that load read:
- import: `import mgtq.pipeline` (diffusers, transformers), timed apart from the load;
- hashing: sha256 of every file the load verifies (`mgtq.components.verified_files`: the quantized transformer's
  manifest files, the other components' files `model_index.json` records), one after another, from the page cache;
  the load itself hashes them side by side (`mgtq.hashing.hashed_ahead`);
- finite check: every floating-point tensor of the loaded components checked for NaN/inf, with mgtq's
  one-pass check (`mgtq.finite.all_finite`, aminmax) and with `isfinite().all()`, side by side in the process.
Writes benchmarks/results/load_<model>_<cpu class>.json and .md (median [min–max] over the rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# CLIP-ViT-H-14's text tower (Meissonic's text_encoder), vocabulary aside
CLIP_H_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   projection_dim=1024)


def build_folder(model: str, fmt: str, folder: Path, clip_h: bool = True) -> None:
    """The pipeline folder of `model` with its transformer in `fmt` (see module docstring), written once;
    `clip_h` False keeps the model's own text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from mgtq.bench.build import build_pipeline, build_transformer, scales_from_random_inputs
    from mgtq.bench.source import resolve_model

    source = resolve_model(model)
    transformer, _ = build_transformer(source, fmt, scales_from_random_inputs(source) if fmt != "bf16" else None)
    pipe = build_pipeline(source, transformer, torch.bfloat16, 48, 0, "cpu", vq_empty=False)
    if not clip_h:
        pipe.save_pretrained(folder, progress=False)
        return
    tok = pipe.tokenizer
    config = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **CLIP_H_TEXT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.text_encoder = CLIPTextModelWithProjection(config).to(torch.float16).eval()
    pipe.save_pretrained(folder, progress=False)


def measure(folder: Path, threads: int, checks: int, one_by_one: bool = False) -> dict:
    """One fresh process's figures (runs in the child); `one_by_one`: the load hashes its files one check after
    another, as before `hashed_ahead`."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    import mgtq
    import mgtq.pipeline  # noqa: F401  (diffusers and transformers: imported once per process, timed apart)
    from mgtq.components import verified_files
    from mgtq.finite import all_finite
    from mgtq.hashing import sha256_file

    if one_by_one:
        mgtq.pipeline.hashed_ahead = lambda paths: contextlib.nullcontext()

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = mgtq.load(folder, progress=False)
    load_s = time.perf_counter() - t0
    files = verified_files(folder)
    t0 = time.perf_counter()
    for path in files:
        sha256_file(path)
    hashing_s = time.perf_counter() - t0
    tensors = [t for module in (pipe.transformer, pipe.text_encoder, pipe.vqvae)
               for t in module.state_dict().values() if t.is_floating_point()]
    times = {"aminmax": [], "isfinite": []}
    for _ in range(checks):  # interleaved, so drift lands on both
        for name, check in (("aminmax", all_finite), ("isfinite", lambda t: bool(torch.isfinite(t).all()))):
            t0 = time.perf_counter()
            assert all(check(t) for t in tensors)
            times[name].append(time.perf_counter() - t0)
    return {"import_s": import_s, "load_s": load_s, "hashing_s": hashing_s,
            "hashed_bytes": sum(p.stat().st_size for p in files),
            "finite_aminmax_s": min(times["aminmax"]), "finite_isfinite_s": min(times["isfinite"]),
            "checked_elements": sum(t.numel() for t in tensors)}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def to_markdown(report: dict) -> str:
    lines = [f"# `mgtq.load` time — {report['model']}, text encoder {report['text_encoder']}", "",
             f"Machine: {report['cpu']} (class {report['cpu_class']}), {report['threads']} torch thread(s), "
             f"torch {report['torch']}. {report['rounds']} interleaved rounds, a fresh process per format and round; "
             "median [min–max] seconds. Import: `import mgtq.pipeline` (torch already imported; diffusers and "
             "transformers with it); load: `mgtq.load(folder)` after it, every check included.", "",
             "| format | folder MB | import s | load s | sha256 of verified files s (MB) | NaN/inf check, aminmax s | "
             "isfinite().all() s | elements checked (M) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt, r in report["formats"].items():
        cell = lambda k: f"{r[k]['median']:.2f} [{r[k]['min']:.2f}–{r[k]['max']:.2f}]"  # noqa: E731
        lines.append(f"| {fmt} | {r['folder_bytes'] / 1e6:,.0f} | {cell('import_s')} | {cell('load_s')} | "
                     f"{cell('hashing_s')} "
                     f"({r['hashed_bytes'] / 1e6:,.0f}) | {cell('finite_aminmax_s')} | {cell('finite_isfinite_s')} | "
                     f"{r['checked_elements'] / 1e6:,.0f} |")
    for fmt, r in report.get("load_vs_one_by_one", {}).items():
        lines.append(f"\n{fmt}: load with the files hashed side by side ÷ one by one, median of the per-round ratios "
                     f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]")
    lines += ["", f"`{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="meissonic-1024")
    p.add_argument("--formats", default="scq,bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--checks", type=int, default=3, help="finite-check repeats per process (the fastest counts)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-encoder", choices=("clip-h", "model"), default="clip-h",
                   help="CLIP-ViT-H-14's text-tower shape (Meissonic's), or the model's own")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-load")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compare-one-by-one", action="store_true",
                   help="also time each format's load hashing its files one after another (before hashed_ahead)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-by-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.threads, args.checks, args.one_by_one)))
        return 0
    from mgtq.native.cpu import cpu_class, cpu_model

    formats = args.formats.split(",")
    folders = {fmt: args.work / f"{args.model}-{fmt}-{args.text_encoder}" for fmt in formats}
    for fmt, folder in folders.items():
        if not (folder / "model_index.json").exists():
            print(f"building {folder.name} …", flush=True)
            build_folder(args.model, fmt, folder, clip_h=args.text_encoder == "clip-h")
    variants = [(fmt, False) for fmt in formats] + ([(fmt, True) for fmt in formats] if args.compare_one_by_one
                                                      else [])
    label = lambda fmt, one_by_one: f"{fmt}, hashed one by one" if one_by_one else fmt  # noqa: E731
    samples = {label(*v): [] for v in variants}
    for k in range(args.rounds):
        for fmt, one_by_one in variants[k % len(variants):] + variants[: k % len(variants)]:  # each leads in turn
            out = subprocess.run([sys.executable, __file__, "--child", str(folders[fmt]), "--threads",
                                  str(args.threads), "--checks", str(args.checks)] + ["--one-by-one"] * one_by_one,
                                 capture_output=True, text=True, check=True)
            samples[label(fmt, one_by_one)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(label(fmt, one_by_one), samples[label(fmt, one_by_one)][-1], flush=True)
    report = {"model": args.model, "text_encoder": args.text_encoder, "cpu": cpu_model(), "cpu_class": cpu_class(),
              "threads": args.threads, "torch": torch.__version__, "rounds": args.rounds,
              "command": "python benchmarks/bench_load.py " + " ".join(a for a in (argv or sys.argv[1:])),
              "formats": {}, "load_vs_one_by_one": {}}
    for fmt, runs in samples.items():
        entry = {key: summary([r[key] for r in runs]) for key in
                 ("import_s", "load_s", "hashing_s", "finite_aminmax_s", "finite_isfinite_s")}
        entry.update(hashed_bytes=runs[0]["hashed_bytes"], checked_elements=runs[0]["checked_elements"],
                     folder_bytes=sum(f.stat().st_size for f in folders[fmt.split(",")[0]].rglob("*") if f.is_file()))
        report["formats"][fmt] = entry
    for fmt in formats if args.compare_one_by_one else ():  # per-round ratios: the rounds ran side by side
        pairs = zip(samples[fmt], samples[label(fmt, True)])
        report["load_vs_one_by_one"][fmt] = summary([a["load_s"] / b["load_s"] for a, b in pairs])
    out = args.out or RESULTS / f"load_{args.model}_{cpu_class()}"
    from mgtq.files import atomic_write_text, write_json

    write_json(out.with_suffix(".json"), report)
    atomic_write_text(out.with_suffix(".md"), to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
