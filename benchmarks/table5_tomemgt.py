"""The paper's Table 5 (TomeMGT) quality half on the embedded model: ShapeBench accuracy and token
agreement with the unmerged model at the same seeds, float and SCQ, per TomeMGT setting.

    # choose the mask-aware default on the validation split (first 64 prompts):
    python benchmarks/table5_tomemgt.py --split val --limit 64 --out benchmarks/results/tomemgt_select_val \\
        --settings joint:0.5:global joint:0.5:cell joint:0.5:cell,sources=decoded ...
    # Table 5 on all 320 test prompts (global vs cell vs the default, ratios 0.25/0.5/0.75, joint and all):
    python benchmarks/table5_tomemgt.py --scq checkpoints/tiny-shapes-w4a8-scq --grid table5 --threads 1

A setting is `blocks:ratio:options`: blocks joint | all | single (`+mlp` also merges before the
MLP of joint blocks), options a comma list of TomeConfig fields (`global` and `cell` are
that locality without mask awareness, `default` keeps TomeConfig's defaults; later items win). Resumable: a setting already in
the results JSON for the same model, split and limit is skipped, and the unmerged reference
tokens are cached under --cache. The latency half on the meissonic-1024 config is
benchmarks/bench_tomemgt.py; `--plot` draws accuracy against its forward speed-ups.
Writes OUT.json and OUT.md (default benchmarks/results/table5_tomemgt), and OUT.png with --plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline
from mgtq.files import atomic_write_text, write_json
from mgtq.hashing import sha256_file
from mgtq.merging import TomeConfig, apply_tomemgt, remove_tomemgt
from mgtq.pipeline import MGTPipeline
from mgtq.quantization.kernels import describe_kernels, kernels_label

from paired import paired_cell, paired_or_none  # this folder's

RESULTS = Path(__file__).resolve().parent / "results"
# Plain (not mask-aware) matching, whatever TomeConfig's defaults are; "default" keeps those.
SHORTHANDS = {"global": {"locality": "global", "sources": "all", "schedule": "constant", "proportional_attention": False},
              "cell": {"locality": "cell", "sources": "all", "schedule": "constant", "proportional_attention": False},
              "default": {}}
# Table 5's grid: the paper's global matching, plain cell locality, and the default (mask-aware) setting.
TABLE5_VARIANTS = ("global", "cell", "default")
TABLE5_EXTRA = ("joint+mlp:0.5:default", "all+mlp:0.5:default")  # issue 19: the official code's MLP merging


def table5_settings() -> list[str]:
    grid = [f"{blocks}:{ratio}:{variant}" for blocks in ("joint", "all") for ratio in (0.25, 0.5, 0.75)
            for variant in TABLE5_VARIANTS]
    return grid + list(TABLE5_EXTRA)


def parse_setting(text: str) -> TomeConfig:
    """'joint:0.5:cell,sources=decoded' → TomeConfig (validated; unknown keys named)."""
    try:
        blocks, ratio, options = text.split(":")
    except ValueError:
        raise ValueError(f"setting {text!r} is not blocks:ratio:options (e.g. joint:0.5:cell,sources=decoded)") from None
    merge_mlp = blocks.endswith("+mlp")
    values: dict = {"blocks": blocks.removesuffix("+mlp"), "ratio": float(ratio), "merge_mlp": merge_mlp}
    types = {f.name: f.type for f in fields(TomeConfig)}
    for item in filter(None, options.split(",")):
        if item in SHORTHANDS:
            values.update(SHORTHANDS[item])
            continue
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"unknown TomeMGT option {key!r} in {text!r}; valid: {sorted(types)} or {sorted(SHORTHANDS)}")
        values[key] = int(value) if types[key] in ("int", int) else (value == "true" if types[key] in ("bool", bool) else value)
    return TomeConfig.from_dict(values)


def variant_name(config: TomeConfig) -> str:
    """What differs from TomeConfig's defaults (apart from ratio/blocks/merge_mlp), e.g. 'locality=global'."""
    base = asdict(TomeConfig())
    diff = [f"{k}={v}" for k, v in asdict(config).items()
            if k not in ("ratio", "blocks", "merge_mlp") and v != base[k]]
    return ",".join(diff) or "default"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="float pipeline folder (default: the embedded model)")
    p.add_argument("--scq", type=Path, default=None, help="an exported SCQ checkpoint to measure too")
    p.add_argument("--models", default="float,scq", help="which of float,scq to run (scq needs --scq)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--grid", choices=["table5"], default=None, help="the Table 5 settings (added to --settings)")
    p.add_argument("--settings", nargs="*", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "table5_tomemgt")
    p.add_argument("--cache", type=Path, default=Path("runs/table5_tomemgt"), help="unmerged reference tokens")
    p.add_argument("--plot", action="store_true", help="also draw OUT.png from OUT.json and tomemgt_latency.json")
    p.add_argument("--render-only", action="store_true", help="rewrite OUT.md (and the plot) from OUT.json")
    args = p.parse_args(argv)
    command = "python benchmarks/table5_tomemgt.py " + " ".join(sys.argv[1:] if argv is None else argv)
    json_path = args.out.with_suffix(".json")
    payload = json.loads(json_path.read_text()) if json_path.exists() else {"rows": []}
    if not args.render_only:
        run(args, payload, command, json_path)
    payload = with_paired(payload)
    if payload["rows"]:
        write_json(json_path, payload)
    write_markdown(args.out.with_suffix(".md"), payload)
    if args.plot:
        plot(args.out.with_suffix(".png"), payload, json.loads((RESULTS / "tomemgt_latency.json").read_text()))
    return 0


def run(args, payload: dict, command: str, json_path: Path) -> None:
    torch.set_num_threads(args.threads)
    settings = (table5_settings() if args.grid else []) + list(args.settings)
    configs = {s: parse_setting(s) for s in settings}  # fail before the slow part
    models = {"float": args.model or default_model(), "SCQ W4A8": args.scq}
    wanted = {"float": "float", "scq": "SCQ W4A8"}
    payload.setdefault("commands", [])
    if command not in payload["commands"]:
        payload["commands"].append(command)
    rows = payload["rows"]

    identity = {name: _weights_sha256(path) for name, path in models.items() if path is not None}
    kernels = describe_kernels("cpu")  # a quantized model's score follows the CPU class's kernels

    def done(model, key):
        # the stored config, not only the key: "default" means another config after TomeConfig's defaults change
        config = asdict(configs[key]) if key != "none" else None
        return any(r["model"] == model and r["split"] == args.split and r["limit"] == args.limit and r["key"] == key
                   and r["config"] == config and r.get("weights_sha256") == identity[model]
                   and r.get("kernels") == kernels for r in rows)

    for short in args.models.split(","):
        name = wanted[short]
        if models[name] is None:
            raise SystemExit("--models scq needs --scq CHECKPOINT")
        if all(done(name, k) for k in ["none", *configs]):
            continue
        # rows of another checkpoint under the same name (a re-exported SCQ) or of other kernels are stale: drop them
        rows[:] = [r for r in rows
                   if r["model"] != name or (r.get("weights_sha256"), r.get("kernels")) == (identity[name], kernels)]
        pipe = MGTPipeline.from_pretrained(models[name])
        cache = args.cache / (f"{short}_{identity[name][:12]}_{kernels['cpu_class']}_{args.split}_"
                              f"{args.limit or 'all'}.pt")
        if cache.exists():
            reference = torch.load(cache)
        else:
            start = time.perf_counter()
            res = evaluate_pipeline(pipe, args.limit, progress=False, split=args.split)
            reference = {"tokens": res["tokens"], "overall": res["overall"], "n": res["n"],
                         "per_category": res["per_category"], "seconds": time.perf_counter() - start}
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(reference, cache)
        if not done(name, "none"):
            rows.append(_row(name, args, "none", None, reference, 1.0) | {"weights_sha256": identity[name],
                                                                          "kernels": kernels})
            _save(json_path, payload, pipe)
        for key, config in configs.items():
            if done(name, key):
                continue
            apply_tomemgt(pipe, config)
            start = time.perf_counter()
            try:
                res = evaluate_pipeline(pipe, args.limit, progress=False, split=args.split,
                                        reference_tokens=reference["tokens"])
            finally:
                remove_tomemgt(pipe)
            res["seconds"] = time.perf_counter() - start
            rows.append(_row(name, args, key, config, res, res["token_agreement"]) | {"weights_sha256": identity[name],
                                                                                       "kernels": kernels})
            print(f"{name} {key}: acc {res['overall']:.3f} agreement {res['token_agreement']:.3f} "
                  f"({res['seconds']:.0f} s)", flush=True)
            _save(json_path, payload, pipe)


def _weights_sha256(checkpoint) -> str:
    """sha256 of the transformer's weights file: which checkpoint a row measured."""
    return sha256_file(Path(checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors")


def _row(model, args, key, config, res, agreement) -> dict:
    return {"model": model, "split": args.split, "limit": args.limit, "key": key,
            "blocks": config.blocks + ("+mlp" if config.merge_mlp else "") if config else "-",
            "ratio": config.ratio if config else 0.0, "variant": variant_name(config) if config else "no merging",
            "config": asdict(config) if config else None, "accuracy": res["overall"],
            "per_category": res["per_category"], "token_agreement": agreement, "n": res["n"],
            "seconds": round(res["seconds"], 1), "ok": [row["ok"] for row in res["per_prompt"]]}


def _save(path: Path, payload: dict, pipe) -> None:
    payload["sampler"] = pipe.settings.sampler.to_dict()
    payload["default_config"] = asdict(TomeConfig())
    write_json(path, payload)


def with_paired(payload: dict) -> dict:
    """`payload` with each merged row's paired accuracy difference against the same model without merging on the
    same prompts (`paired_vs_none`, from the per-prompt verdicts; None where a side lacks them)."""
    unmerged = {(r["model"], r["split"], r["limit"]): r.get("ok") for r in payload["rows"] if r["key"] == "none"}
    rows = [r if r["key"] == "none" else {**r, "paired_vs_none": paired_or_none(
                unmerged.get((r["model"], r["split"], r["limit"])), r.get("ok"))} for r in payload["rows"]]
    return {**payload, "rows": rows}


def write_markdown(path: Path, payload: dict) -> None:
    lines = ["ShapeBench accuracy; token agreement = fraction of tokens equal to the same model without merging at "
             "the same seeds; Δ [95% CI]: the paired accuracy difference on the same prompts and seeds with its 95% "
             "interval (Newcombe's method 10). Variant = the TomeConfig fields that differ from the current default "
             f"({_describe(asdict(TomeConfig()))}).", "",
             "Commands: " + "; ".join(f"`{c}`" for c in payload.get("commands", [])), "",
             *[f"Kernels: {label}" for label in sorted({kernels_label(r["kernels"]) for r in payload["rows"]
                                                        if r.get("kernels")})], ""]
    groups: dict = {}
    for r in payload["rows"]:
        groups.setdefault((r["model"], r["split"], r["limit"]), []).append(r)
    for (model, split, limit), rows in groups.items():
        lines += [f"### {model}, {split} split, n = {rows[0]['n']}" + (f" (first {limit})" if limit else ""), "",
                  "| blocks | ratio | variant | ShapeBench acc. | Δ vs no merging | Δ vs no merging [95% CI] "
                  "| token agreement |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        base = next((r["accuracy"] for r in rows if r["key"] == "none"), None)
        for r in sorted(rows, key=lambda r: (r["key"] != "none", r["blocks"], r["ratio"])):
            delta = f"{r['accuracy'] - base:+.3f}" if base is not None and r["key"] != "none" else ""
            variant = variant_name(TomeConfig(**r["config"])) if r["config"] else r["variant"]
            paired = "" if r["key"] == "none" else paired_cell(r.get("paired_vs_none"))
            lines.append(f"| {r['blocks']} | {r['ratio']} | {variant} | {r['accuracy']:.3f} | {delta} | {paired} | "
                         f"{r['token_agreement']:.3f} |")
        lines.append("")
    atomic_write_text(path, "\n".join(lines))


def _describe(config: dict | None) -> str:
    if not config:
        return "see TomeConfig"
    return ", ".join(f"{k}={config[k]}" for k in ("locality", "sources", "schedule"))


def _kind(config: dict) -> str:
    """Which Table 5 family a stored config belongs to: global, cell, default (today's) or other."""
    for name in TABLE5_VARIANTS:
        setting = asdict(parse_setting(f"{config['blocks']}:{config['ratio']}:{name}"))
        if setting == {**config, "merge_mlp": False}:
            return name
        if name == "default" and {**setting, "proportional_attention": False} == {**config, "merge_mlp": False}:
            return "default-plain"
    return "other"


def plot(path: Path, payload: dict, latency: dict) -> None:
    """Accuracy (float, test) against forward speed-up at meissonic-1024, Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # joined on the whole TomeConfig: a key such as "joint:0.5:default" names another config once the defaults change
    speed = {json.dumps(r["config"], sort_keys=True): r["speedup"] for r in latency["rows"]}
    points = [(speed[json.dumps(r["config"], sort_keys=True)], r["accuracy"], r) for r in payload["rows"]
              if r["model"] == "float" and r["split"] == "test" and r["limit"] is None
              and json.dumps(r["config"], sort_keys=True) in speed]
    if not points:
        raise SystemExit("no float test rows with a measured speed-up to plot")
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1])
                                          for q in points)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"none": "*", "global": "x", "cell": "s", "default": "o", "default-plain": "^"}
    for s, acc, r in points:
        kind = "none" if r["key"] == "none" else _kind(r["config"])
        color = "k" if kind == "none" else "C0" if r["blocks"].startswith("joint") else "C1"
        ax.scatter(s, acc, marker=markers.get(kind, "^"), color=color,
                   s=60 if kind != "none" else 160, zorder=3)
        if r["key"] != "none":
            ax.annotate(f"{r['blocks']} {r['ratio']} {kind}", (s, acc), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    front.sort()
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front", zorder=2)
    base = next(acc for s, acc, r in points if r["key"] == "none")
    ax.axhline(base - 0.05, color="gray", lw=0.8, ls=":", label="no merging − 0.05")
    ax.axhline(base - 0.10, color="gray", lw=0.8, ls="-.", label="no merging − 0.10")
    ax.axvline(1.4, color="gray", lw=0.8, ls="--", label="1.4× speed-up")
    for kind, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label={"none": "no merging", "default": "default (mask-aware)",
                                                          "default-plain": "default without proportional attention"}.get(kind, kind))
    ax.scatter([], [], marker="s", color="C0", label="joint blocks")
    ax.scatter([], [], marker="s", color="C1", label="all blocks")
    ax.set_xlabel("transformer forward speed-up, meissonic-1024, 1 thread (bench_tomemgt.py)")
    ax.set_ylabel("ShapeBench accuracy, embedded model, float, test (n=320)")
    ax.set_title("TomeMGT: quality vs speed")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
