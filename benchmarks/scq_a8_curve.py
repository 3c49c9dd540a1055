"""SCQ quality against the fraction of layers on A8, per selection method (issue 18's curve).

Every point is a full `mgtq calibrate` run of the default recipe with group-wise int4 where
activations stay 16-bit (`qat.group_size`, per channel on the A8 layers), `secondary.fraction` and
`secondary.selection` set, exported and evaluated on ShapeBench: the validation split (for choosing
the recommended setting) and the test split (for reporting), with token agreement against the float
model at the same seeds, plus QAT's own fit (KL to the float model's masked-token predictions on a
fixed set of masks, `qat/stage.json`).

    python benchmarks/scq_a8_curve.py --threads 1                  # the whole grid (resumable)
    python benchmarks/scq_a8_curve.py --render-only                 # rewrite OUT.md / OUT.png from OUT.json (and its
                                                                    # paired differences against the float model)

Fraction 0 (no A8 layer) and 1 (every layer A8) do not depend on the selection method and run once.
Each run copies the synthesized calibration set of BASE_RUN (a finished run of the default recipe;
calibrated first if missing), so every point is calibrated on the same images. Resumable: a finished
run folder or checkpoint is reused, a point already in OUT.json is skipped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline
from mgtq.export import export_run
from mgtq.files import atomic_directory, atomic_write_text, read_json, write_json
from mgtq.pipeline import MGTPipeline
from mgtq.quantization import model_weight_nbytes
from mgtq.quantization.kernels import describe_kernels, kernels_label
from mgtq.scq.calibrate import calibrate
from mgtq.scq.recipe import load_recipe, recipe_from_dict
from mgtq.scq.run import RunFolder

from paired import paired_cell, paired_or_none  # this folder's

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RECIPE = REPO / "recipes" / "tiny-shapes-w4a8-scq.yaml"
FRACTIONS = (0.0, 1 / 3, 2 / 3, 1.0)
SELECTIONS = ("lowest", "sensitivity", "random")


def points(fractions, selections) -> list[tuple[float, str]]:
    """(fraction, selection) to run; the ends of the curve are one point each ("all" = every layer)."""
    out = []
    for f in fractions:
        if f == 0.0:
            out.append((0.0, "lowest"))  # no layer on A8: the selection never matters
        elif f == 1.0:
            out.append((1.0, "all"))
        else:
            out.extend((f, s) for s in selections)
    return list(dict.fromkeys(out))


def point_name(fraction: float, selection: str, group_size: int | None) -> str:
    grid = f"g{group_size}" if group_size else "pc"
    if fraction == 0.0:
        return f"{grid}-a8-none"
    if fraction == 1.0:
        return f"{grid}-a8-all"
    return f"{grid}-a8-{round(fraction * 100)}-{selection}"


def point_recipe(base: dict, fraction: float, selection: str, group_size: int | None):
    return recipe_from_dict({**base, "qat": {**base["qat"], "group_size": group_size},
                             "secondary": {**base["secondary"], "fraction": fraction, "selection": selection}})


def seed_run(base_run: Path, run: Path) -> None:
    """A point's run folder starts as a copy of the base run (whole: `mgtq calibrate` takes only its own runs), so
    the point's calibration, restarted with the point's recipe, reuses the stages whose inputs are the same: the
    synthesized images always (every point is calibrated on the same images), QAT where its settings match."""
    with atomic_directory(run, overwrite=False) as tmp:
        shutil.copytree(base_run, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(RunFolder.LOCK))


def calibrated_checkpoint(recipe, base_run: Path, work: Path, name: str, progress: bool) -> tuple[Path, Path]:
    run, ckpt = work / name, work / f"{name}-ckpt"
    if not run.exists():
        seed_run(base_run, run)
    calibrate(recipe, run, progress=progress, restart=True)
    if not (ckpt / "model_index.json").is_file():
        export_run(run, ckpt, overwrite=True)
    return run, ckpt


def qat_fit(run: Path) -> dict:
    stage = read_json(run / "qat" / "stage.json")
    return {"kl_before": stage["loss_before"]["kl_to_float"], "kl_after": stage["loss_after"]["kl_to_float"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe every point starts from")
    p.add_argument("--group-size", type=int, default=64, help="int4 group of the A16 layers (0 = per channel)")
    p.add_argument("--fractions", default="0,1/3,2/3,1")
    p.add_argument("--selections", default=",".join(SELECTIONS))
    p.add_argument("--base-run", type=Path, default=REPO / "calibration" / "tiny-shapes-w4a8-scq",
                   help="a run of --recipe whose synthesized set every point reuses (calibrated if missing)")
    p.add_argument("--work", type=Path, default=REPO / "calibration" / "a8-curve")
    p.add_argument("--val-limit", type=int, default=160, help="validation prompts (choosing)")
    p.add_argument("--test-limit", type=int, default=None, help="test prompts (reporting; default all 320)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "scq_a8_curve")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    json_path = args.out.with_suffix(".json")
    payload = read_json(json_path) if json_path.exists() else {"points": [], "float": {}}
    if not args.render_only:
        run_grid(args, payload, json_path)
    payload = with_paired(payload)
    render(payload, args.out)
    write_json(json_path, payload)
    return 0


def _fraction(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


def run_grid(args, payload: dict, json_path: Path) -> None:
    torch.set_num_threads(args.threads)
    group_size = args.group_size or None
    grid = points([_fraction(f) for f in args.fractions.split(",")], args.selections.split(","))
    base_recipe = load_recipe(args.recipe)
    if not (args.base_run / "synth").is_dir():
        calibrate(base_recipe, args.base_run, progress=False)
    kernels = describe_kernels("cpu")  # a quantized model's score follows the CPU class's kernels
    if payload["points"] and payload.get("kernels") != kernels:
        raise SystemExit(f"{json_path} holds points measured with other kernels ({payload.get('kernels')}); "
                         "pass another --out, or remove the file to start over")
    payload.update(recipe=base_recipe.to_dict(), group_size=group_size, kernels=kernels,
                   command=" ".join(["python benchmarks/scq_a8_curve.py", *sys.argv[1:]]))
    splits = (("val", args.val_limit), ("test", args.test_limit))
    float_pipe = MGTPipeline.from_pretrained(default_model())
    references = {}
    for split, limit in splits:
        key = f"{split}:{limit}"
        res = evaluate_pipeline(float_pipe, limit, progress=False, split=split)
        references[split] = res["tokens"]
        payload["float"][key] = {"accuracy": res["overall"], "n": res["n"],
                                 "per_prompt": [p["ok"] for p in res["per_prompt"]]}
    write_json(json_path, payload)
    done = {(p["name"]) for p in payload["points"]}
    for fraction, selection in grid:
        name = point_name(fraction, selection, group_size)
        if name in done:
            continue
        start = time.perf_counter()
        recipe = point_recipe(base_recipe.to_dict(), fraction, selection, group_size)
        run, ckpt = calibrated_checkpoint(recipe, args.base_run, args.work, name, progress=False)
        calib_s = time.perf_counter() - start
        pipe = MGTPipeline.from_pretrained(ckpt)
        point = {"name": name, "fraction": fraction, "selection": selection, "group_size": group_size,
                 "a8_layers": sum(1 for s in read_json(ckpt / "transformer" / "manifest.json")["layers"].values()
                                  if s["scheme"] == "w4a8"),
                 "linear_weight_bytes": model_weight_nbytes(pipe.transformer),
                 "calibrate_seconds": round(calib_s, 1), **qat_fit(run)}
        for split, limit in splits:
            res = evaluate_pipeline(pipe, limit, progress=False, split=split, reference_tokens=references[split])
            point[split] = {"accuracy": res["overall"], "n": res["n"], "token_agreement": res["token_agreement"],
                            "per_prompt": [p["ok"] for p in res["per_prompt"]]}
        payload["points"].append(point)
        write_json(json_path, payload)
        print(f"{name}: val {point['val']['accuracy']:.3f} test {point['test']['accuracy']:.3f} "
              f"agree {point['test']['token_agreement']:.3f} KL {point['kl_after']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def with_paired(payload: dict) -> dict:
    """`payload` with each point's paired accuracy difference against the float model on each split
    (`paired_vs_float`, from the per-prompt verdicts; None where a side lacks them)."""
    floats = {(key.partition(":")[0], result["n"]): result.get("per_prompt")
              for key, result in payload["float"].items()}
    points = [{**p, **{split: {**p[split], "paired_vs_float": paired_or_none(floats.get((split, p[split]["n"])),
                                                                             p[split].get("per_prompt"))}
                       for split in ("val", "test") if split in p}}
              for p in payload["points"]]
    return {**payload, "points": points}


def render(payload: dict, out: Path) -> None:
    pts = sorted(payload["points"], key=lambda p: (p["fraction"], p["selection"]))
    if not pts:
        raise SystemExit("no points measured yet")
    val_key = next(k for k in payload["float"] if k.startswith("val:"))
    test_key = next(k for k in payload["float"] if k.startswith("test:"))
    fv, ft = payload["float"][val_key], payload["float"][test_key]
    lines = [
        f"SCQ on the embedded model with int4 weights in groups of {payload['group_size']} where activations stay "
        "16-bit (per channel on the A8 layers): ShapeBench accuracy against the fraction of transformer Linears "
        "whose activations go to int8, per selection method. Val: the first "
        f"{fv['n']} validation prompts (for choosing); test: {ft['n']} test prompts (for reporting); token agreement "
        "with the float model at the same seeds; QAT KL: QAT's own fit to the float model's masked-token "
        "predictions on a fixed set of masks (lower is better).", "",
        f"Command: `{payload['command']}`", "",
        *([f"Kernels: {kernels_label(payload['kernels'])}", ""] if payload.get("kernels") else []),
        f"Float model: val {fv['accuracy']:.3f}, test {ft['accuracy']:.3f}.", "",
        "Δ test vs float [95% CI]: paired accuracy difference on the same test prompts and seeds, with its 95% "
        "interval (Newcombe's method 10).", "",
        "| A8 fraction | selection | A8 layers | val acc. | test acc. | Δ test vs float | Δ test vs float [95% CI] "
        "| test token agreement | QAT KL | Linear weight bytes |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in pts:
        lines.append(f"| {p['fraction']:.2f} | {p['selection'] if 0 < p['fraction'] < 1 else '-'} | {p['a8_layers']} | "
                     f"{p['val']['accuracy']:.3f} | {p['test']['accuracy']:.3f} | "
                     f"{p['test']['accuracy'] - ft['accuracy']:+.3f} | "
                     f"{paired_cell(p['test'].get('paired_vs_float'))} | {p['test']['token_agreement']:.3f} | "
                     f"{p['kl_after']:.4f} | {p['linear_weight_bytes']:,} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(pts, ft, fv, out.with_suffix(".png"))


def plot(pts: list[dict], float_test: dict, float_val: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ends = [p for p in pts if p["fraction"] in (0.0, 1.0)]
    for ax, split, ref in ((axes[0], "test", float_test), (axes[1], "val", float_val)):
        for i, selection in enumerate(SELECTIONS):
            line = sorted(ends + [p for p in pts if p["selection"] == selection], key=lambda p: p["fraction"])
            ax.plot([p["fraction"] for p in line], [p[split]["accuracy"] for p in line], "o-", color=f"C{i}",
                    label=selection)
        ax.axhline(ref["accuracy"], color="k", lw=0.8, ls="--", label="float")
        ax.axhline(ref["accuracy"] - 0.01, color="gray", lw=0.8, ls=":", label="float − 0.01")
        ax.set_xlabel("fraction of Linears with int8 activations")
        ax.set_ylabel(f"ShapeBench accuracy ({split}, n={ref['n']})")
        ax.set_xticks([0, 1 / 3, 2 / 3, 1], ["0", "⅓", "⅔", "1"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("test split (reported)")
    axes[1].set_title("validation split (used to choose)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
