"""The paper's Table 3 (SCQ ablation) on mgtq's embedded tiny-shapes model.

Rows: fp32, bf16, W4A16 PTQ, W4A8 PTQ (every layer A8, no QAT), W4A8 QAT + a random third on A8,
W4A8 SCQ (the lowest-magnitude third on A8). Columns: ShapeBench accuracy, its paired difference from fp32
with a 95% interval (benchmarks/paired.py), token agreement with fp32 at the same seeds, transformer Linear
weight bytes, transformer bytes in all.

    python benchmarks/table3_scq.py                       # full ShapeBench (320 prompts)
    python benchmarks/table3_scq.py --limit 40            # quick look
    python benchmarks/table3_scq.py --render              # OUT.md again from OUT.json, no generation
    python benchmarks/table3_scq.py --rows main --recipe recipes/tiny-shapes-16x16-w4a8-scq.yaml \
        --work calibration/table3-16x16 --out benchmarks/results/table3_scq_16x16 --seed-sets 1

`--rows main` measures fp32, W4A16 PTQ and W4A8 SCQ only, and skips the calibrations the other
rows need (a copy of the run for the random selection, the CE and A8-in-the-loop variants).

The SCQ and QAT+random rows come from `mgtq calibrate` runs of recipes/tiny-shapes-w4a8-scq.yaml
(the random row re-runs only the secondary stage of a copy of that run); PTQ rows quantize the float
model directly, with activation scales calibrated on the same synthesized set.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mgtq.evaluation import evaluate_pipeline
from mgtq.export import export_run
from mgtq.files import atomic_write_text, read_json, write_json
from mgtq.hashing import model_fingerprint
from mgtq.pipeline import MGTPipeline
from mgtq.quantization import (W4A8Config, W4A16Config, input_scales_from_stats, linear_names, model_weight_nbytes,
                               prepare_qat_, quantize_)
from mgtq.quantization.kernels import describe_kernels, kernels_label
from mgtq.scq.calibrate import calibrate, resolve_model
from mgtq.scq.recipe import load_recipe, recipe_from_dict
from mgtq.scq.magnitudes import record_activation_stats
from mgtq.scq.run import RunFolder
from mgtq.scq.stages import load_calibration_data
from mgtq.scq.synthesis import synthesis_sampler

from paired import paired_cell, paired_or_none  # this folder's

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny-shapes-w4a8-scq.yaml"
WORK = REPO / "calibration" / "table3"
OUT = REPO / "benchmarks" / "results" / "table3_scq"
MAIN_ROWS = ("fp32", "W4A16 PTQ", "W4A8 SCQ (lowest third A8)")
SEED_SET_STRIDE = 1_000_000  # seed set k draws every prompt with seed + k·stride (ShapeBench seeds are < 10⁶)


def transformer_bytes(model: torch.nn.Module) -> tuple[int, int]:
    return model_weight_nbytes(model), model_weight_nbytes(model, linear_only=False)


def ptq_pipeline(base: MGTPipeline, run: Path, recipe, a8_all: bool) -> MGTPipeline:
    """Quantize the float transformer without QAT; A8 scales calibrated on the synthesized set."""
    pipe = copy.copy(base)
    model = copy.deepcopy(base.transformer).float()
    names = linear_names(model, recipe.qat.skip)
    scales = {}
    if a8_all:
        data = load_calibration_data(RunFolder(run), base)
        probe = copy.deepcopy(model)
        prepare_qat_(probe, group_size=recipe.qat.group_size, skip=recipe.qat.skip)  # W4 weights, as deployed
        sampler = synthesis_sampler(base.settings.sampler, recipe.synthesis)
        stats = record_activation_stats(probe, data, recipe.magnitudes, sampler, names, progress=False)
        scales = input_scales_from_stats(stats, recipe.secondary.scale_method, recipe.secondary.percentile)
    overrides = {pattern: None for pattern in recipe.qat.skip}  # skipped layers stay float
    overrides.update({name: W4A8Config() for name in names} if a8_all else {})
    quantize_(model, W4A16Config(recipe.qat.group_size), overrides=overrides, input_scales=scales)
    pipe.transformer = model.eval()
    return pipe


def _derived_checkpoint(recipe, scq_run: Path, run: Path, ckpt: Path) -> Path:
    """Calibrate `recipe` in `run` on the SCQ run's synthesized set (QAT onwards runs again) and export it."""
    if not run.exists():
        run.mkdir(parents=True)
        shutil.copytree(scq_run / "synth", run / "synth")
    calibrate(recipe, run, restart=True)
    return export_run(run, ckpt, overwrite=True)


def _reference_path(work: Path, limit, offset: int) -> Path:
    return work / "fp32-tokens" / f"limit-{limit or 'all'}-offset-{offset}.safetensors"


def _save_reference(work: Path, limit, offset: int, tokens: torch.Tensor) -> None:
    path = _reference_path(work, limit, offset)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens.contiguous()}, str(path))


def _load_reference(work: Path, limit, offset: int) -> torch.Tensor:
    return load_file(str(_reference_path(work, limit, offset)))["tokens"]


def _references_cached(work: Path, limit, offsets) -> bool:
    return all(_reference_path(work, limit, o).is_file() for o in offsets)


def qat_metrics(work: Path) -> dict:
    """Each calibration run's QAT objective and its fixed-mask metrics before/after (qat/stage.json)."""
    out = {}
    for stage in sorted(work.glob("*/qat/stage.json")):
        d = read_json(stage)
        out[stage.parent.parent.name] = {k: d.get(k) for k in ("objective", "steps", "loss_before", "loss_after")}
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def command_line(args) -> str:
    parts = ["python benchmarks/table3_scq.py"]
    if args.limit:
        parts.append(f"--limit {args.limit}")
    if args.seed_sets != 3:
        parts.append(f"--seed-sets {args.seed_sets}")
    if args.work != WORK:
        parts.append(f"--work {_shown(args.work)}")
    if args.recipe != RECIPE:
        parts.append(f"--recipe {_shown(args.recipe)}")
    if args.rows != "all":
        parts.append(f"--rows {args.rows}")
    if args.out != OUT:
        parts.append(f"--out {_shown(args.out)}")
    return " ".join(parts)


def with_paired(payload: dict) -> dict:
    """`payload` with each row's paired accuracy difference against fp32 (`paired_vs_fp32`; None where a side
    lacks per-prompt verdicts): every (prompt, seed set) is one pair, the seed sets drawing other images."""
    def pooled(row: dict) -> list[bool] | None:
        sets = row.get("ok_per_seed_set")
        return None if sets is None else [ok for seed_set in sets for ok in seed_set]

    reference = pooled(next(r for r in payload["rows"] if r["row"] == "fp32"))
    return {**payload, "rows": [r if r["row"] == "fp32" else
                                {**r, "paired_vs_fp32": paired_or_none(reference, pooled(r))} for r in payload["rows"]]}


def to_markdown(payload: dict) -> str:
    results, sampler = payload["rows"], payload["sampler"]
    seed_sets, fp32_bytes = len(results[0]["shapebench_per_seed_set"]), results[0]["transformer_bytes"]
    lines = [f"ShapeBench (n={results[0]['n']} prompts × {seed_sets} seed sets), {sampler['num_steps']} steps, "
             f"CFG {sampler['guidance_scale']}, the same seeds for every row. Accuracy is the mean over the seed "
             "sets (each set's value in brackets); token agreement is the fraction of tokens equal to fp32's at "
             "the same seed; Δ vs fp32: the paired accuracy difference over every prompt of every seed set, with "
             "its 95% interval (Newcombe's method 10).", "",
             f"Command: `{payload['command']}`", "",
             *([f"Kernels: {kernels_label(payload['kernels'])}", ""] if payload.get("kernels") else []),
             "| format | ShapeBench acc. | Δ vs fp32 [95% CI] | token agreement vs fp32 | Linear weight bytes "
             "| transformer bytes (× fp32) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        per_set = ", ".join(f"{a:.3f}" for a in r["shapebench_per_seed_set"])
        versus = paired_cell(r["paired_vs_fp32"]) if "paired_vs_fp32" in r else ""
        lines.append(f"| {r['row']} | {r['shapebench']:.3f} ({per_set}) | {versus} | {r['token_agreement']:.3f} | "
                     f"{r['linear_weight_bytes']:,} | {r['transformer_bytes']:,} "
                     f"({r['transformer_bytes'] / fp32_bytes:.3f}×) |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, payload: dict) -> str:
    """OUT.json and OUT.md from the measured rows (fp32 first); the Markdown."""
    payload = with_paired(payload)
    write_json(out.with_suffix(".json"), payload)
    markdown = to_markdown(payload)
    atomic_write_text(out.with_suffix(".md"), markdown)
    return markdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--recipe", type=Path, default=RECIPE, help="SCQ recipe of the QAT and SCQ rows")
    p.add_argument("--seed-sets", type=int, default=3,
                   help="draw ShapeBench this many times with shifted seeds and average (sampling noise is "
                        "large next to the differences between formats)")
    p.add_argument("--work", type=Path, default=WORK, help="calibration runs and checkpoints (reused when complete)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--rows", choices=("all", "main"), default="all",
                   help="main: fp32, W4A16 PTQ and SCQ only (no extra calibrations)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render", action="store_true",
                   help="only rewrite OUT.json's paired comparisons and OUT.md from OUT.json (no generation)")
    args = p.parse_args(argv)
    if args.render:
        print(write_results(args.out, read_json(args.out.with_suffix(".json"))), end="")
        return 0
    torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe)
    scq_run = args.work / "scq"
    calibrate(recipe, scq_run)
    scq_ckpt = export_run(scq_run, args.work / "ckpt-scq", overwrite=True)
    extra_rows = []
    if args.rows == "all":
        random_recipe = recipe_from_dict({**recipe.to_dict(), "secondary": {**recipe.to_dict()["secondary"],
                                                                             "selection": "random"}})
        random_run = args.work / "qat-random"
        if not random_run.exists():
            shutil.copytree(scq_run, random_run)  # shares synthesize/QAT/magnitudes; only the selection differs
        calibrate(random_recipe, random_run, restart=True)  # the copy takes the random selection
        extra_rows.append(("W4A8 QAT + random third A8", export_run(random_run, args.work / "ckpt-rand", overwrite=True)))
    if args.rows == "all" and recipe.qat.objective != "ce":
        # The same SCQ with the paper's QAT objective (masked-token CE on the synthesized tokens): shows
        # what the recipe's objective changes. Shares the synthesized set; QAT onwards runs again.
        ce_recipe = recipe_from_dict({**recipe.to_dict(), "qat": {**recipe.to_dict()["qat"], "objective": "ce"}})
        ce_ckpt = _derived_checkpoint(ce_recipe, scq_run, args.work / "scq-ce", args.work / "ckpt-scq-ce")
        extra_rows.append(("W4A8 SCQ, paper's CE objective", ce_ckpt))
    if args.rows == "all" and not recipe.qat.activations_in_loop:
        # The official code's QAT: the A8 layers' inputs fake-quantized to int8 (scales calibrated first)
        # inside the loop, so the weights adapt to the activation rounding too.
        loop_recipe = recipe_from_dict({**recipe.to_dict(), "qat": {**recipe.to_dict()["qat"], "activations_in_loop": True}})
        extra_rows.append(("W4A8 SCQ, A8 in the QAT loop",
                           _derived_checkpoint(loop_recipe, scq_run, args.work / "scq-a8-loop", args.work / "ckpt-scq-a8-loop")))

    float_path = resolve_model(recipe)  # what the recipe quantizes
    base = MGTPipeline.from_pretrained(float_path)
    model_name = Path(float_path).name
    bf16 = copy.copy(base)
    bf16.transformer = copy.deepcopy(base.transformer).to(torch.bfloat16)
    float_id = model_fingerprint(float_path)
    ptq_id = json.dumps([float_id, read_json(scq_run / "run.json")["fingerprints"]["synth"], recipe.qat.group_size,
                         recipe.qat.skip, recipe.to_dict()["magnitudes"], recipe.secondary.scale_method,
                         recipe.secondary.percentile])
    checkpoint = lambda path: (model_fingerprint(path), lambda: MGTPipeline.from_pretrained(path))  # noqa: E731
    rows = [
        ("fp32", (float_id, lambda: base)),
        ("bf16", (float_id + ":bf16", lambda: bf16)),
        ("W4A16 PTQ", (ptq_id, lambda: ptq_pipeline(base, scq_run, recipe, a8_all=False))),
        ("W4A8 PTQ (all A8)", (ptq_id, lambda: ptq_pipeline(base, scq_run, recipe, a8_all=True))),
        *[(name, checkpoint(path)) for name, path in extra_rows[:1]],
        ("W4A8 SCQ (lowest third A8)", checkpoint(scq_ckpt)),
        *[(name, checkpoint(path)) for name, path in extra_rows[1:]],
    ]
    if args.rows == "main":
        rows = [row for row in rows if row[0] in MAIN_ROWS]
    offsets = [k * SEED_SET_STRIDE for k in range(args.seed_sets)]
    json_path = args.out.with_suffix(".json")
    # Resumable: a row measured before on the same model (fingerprint), prompts and seed sets is kept.
    # ... and the same kernels (a quantized model's score follows the CPU class's).
    kernels = describe_kernels(base.device)
    earlier = {(r["row"], r.get("identity")): r for r in (read_json(json_path)["rows"] if json_path.exists() else [])
               if r.get("limit", "absent") == args.limit and len(r["shapebench_per_seed_set"]) == args.seed_sets
               and r.get("kernels") == kernels}
    sampler = base.settings.sampler.to_dict()
    results, references = [], {}
    for name, (identity, make) in rows:
        if (name, identity) in earlier and (name == "fp32" or _references_cached(args.work, args.limit, offsets)):
            results.append(earlier[(name, identity)])
            print(f"{name:30s} kept from {json_path.name}", flush=True)
            continue
        pipe = make()
        t0 = time.perf_counter()
        runs = []
        for offset in offsets:
            if offset not in references and name != "fp32":
                references[offset] = _load_reference(args.work, args.limit, offset)
            res = evaluate_pipeline(pipe, limit=args.limit, reference_tokens=references.get(offset), progress=True,
                                    seed_offset=offset)
            if name == "fp32":  # fp32 is every other row's reference
                references[offset] = res["tokens"]
                _save_reference(args.work, args.limit, offset, res["tokens"])
                res["token_agreement"] = 1.0
            runs.append(res)
        linear_bytes, all_bytes = transformer_bytes(pipe.transformer)
        per_set = [r["overall"] for r in runs]
        results.append({"row": name, "identity": identity, "limit": args.limit,
                        "shapebench": sum(per_set) / len(per_set), "shapebench_per_seed_set": per_set,
                        "per_category": runs[0]["per_category"],
                        "token_agreement": sum(r["token_agreement"] for r in runs) / len(runs),
                        "linear_weight_bytes": linear_bytes, "transformer_bytes": all_bytes, "n": runs[0]["n"],
                        "kernels": kernels, "seconds": time.perf_counter() - t0,
                        "ok_per_seed_set": [[row["ok"] for row in r["per_prompt"]] for r in runs]})  # paired comparisons
        print(f"{name:30s} acc={results[-1]['shapebench']:.3f} {per_set} agree={results[-1]['token_agreement']:.3f} "
              f"bytes={all_bytes}", flush=True)
        write_json(json_path, {"model": model_name, "sampler": sampler, "limit": args.limit,
                               "recipe": recipe.to_dict(), "rows": results + [r for r in earlier.values()
                                                                             if r not in results],
                               "command": command_line(args), "partial": True})

    payload = {"model": model_name, "sampler": sampler, "limit": args.limit, "recipe": recipe.to_dict(),
               "rows": results, "qat": qat_metrics(args.work), "command": command_line(args), "kernels": kernels}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(write_results(args.out, payload), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
