"""Enhanced-sampler ablations on ShapeBench (paper Tables 2, 8–11, 13–15, Fig. 8), float and SCQ checkpoints.

For every configuration: ShapeBench accuracy, the per-prompt win/loss against vanilla at the same
steps and seeds with the paired accuracy difference and its 95% interval (benchmarks/paired.py), and
NFE (transformer calls per image).

    python benchmarks/ablations_sampler.py --limit 160 --threads 1                 # float model
    python benchmarks/ablations_sampler.py --limit 160 --threads 1 --model DIR --tag scq
    python benchmarks/ablations_sampler.py --limit 160 --only presets,noise:3      # some groups (noise: its first 3 rows)
    python benchmarks/ablations_sampler.py --tag scq --render                      # the tables again, no generation

Resumable: every evaluation is written to benchmarks/results/ablations_<tag>.json as soon as it ends,
keyed by its sampler settings, and a rerun skips the settings already there (a setting shared by two
groups runs once). `--redo GROUPS` re-runs a group's settings (after a change to the code they use);
`--fresh` starts a new file. A file made from another model, prompt count or split is never mixed in.
Also writes ablations_<tag>.md and, with the rho group, a plot of the schedule sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline
from mgtq.files import atomic_write_text, read_json, write_json
from mgtq.hashing import model_fingerprint
from mgtq.pipeline import MGTPipeline
from mgtq.quantization.kernels import describe_kernels, kernels_label
from mgtq.sampling import SamplerConfig
from mgtq.shapes import shapebench_prompts
from mgtq.shapes.shapebench import DEFAULT_PER_CATEGORY

from paired import paired_cell, paired_difference, paired_or_none  # this folder's

RESULTS = Path(__file__).resolve().parent / "results"


def groups(base: SamplerConfig) -> dict[str, list[tuple[str, SamplerConfig]]]:
    """Named groups of (label, config), in the default run order (within a group too: what matters most
    first, so a run cut short still answers the main question); vanilla at the same steps is the reference."""
    t, s = base.num_steps, base.guidance_scale
    v = SamplerConfig.preset("vanilla", base=base)
    at = lambda cfg, steps: cfg.replace(num_steps=steps)  # noqa: E731
    z = lambda **kw: v.with_overrides({"zsampling.variant": "masked", **{f"zsampling.{k}": x for k, x in kw.items()}})  # noqa: E731
    noise = v.with_overrides({"noise.curve": "abs_cos"})
    root = v.replace(schedule="root", rho=0.6)
    return {
        "presets": [("paper-combo", SamplerConfig.preset("paper-combo", base=base))],
        "momentum": [(f"order 2 T={steps}", at(v.with_overrides({"momentum.order": 2}), steps))
                     for steps in (8, t, 12, 2 * t)],
        "inversion_cfg": [(f"masked Z, inversion CFG {c:g}" + (" (= sampler CFG)" if c == s else ""), z(inversion_cfg=c))
                          for c in dict.fromkeys((-1.0, 0.0, 1.0, s))],
        "noise": [(f"noise {curve} α={a:g}", v.with_overrides({"noise.curve": curve, "noise.scale": a}))
                  for curve, a in (("abs_cos", 1.0), ("abs_cos_half_early", 1.0), ("abs_cos_half_late", 1.0),
                                   ("abs_cos", 2.0), ("half_abs_cos", 1.0), ("constant", 1.0))],
        "official": [("differential z=75%, resample abs (mgtq)", v.with_overrides({"differential.percent": 75.0})),
                     ("differential z=75%, resample clipped (official)",
                      v.with_overrides({"differential.percent": 75.0, "differential.resample": "clipped"})),
                     ("masked Z, remask paper (mgtq)", z()), ("masked Z, remask official", z(remask="official"))],
        "combos": [("noise", noise), ("noise + diff 75%", noise.with_overrides({"differential.percent": 75.0})),
                   ("noise + diff 75% + masked Z = paper-combo", SamplerConfig.preset("paper-combo", base=base)),
                   ("1−t^0.6", root), ("1−t^0.6 + noise", root.with_overrides({"noise.curve": "abs_cos"})),
                   ("1−t^0.6 + noise + diff 75%", root.with_overrides({"noise.curve": "abs_cos",
                                                                       "differential.percent": 75.0})),
                   ("1−t^0.6 + noise + diff 75% + masked Z = paper-combo-root",
                    SamplerConfig.preset("paper-combo-root", base=base))],
        "differential": [(f"z={p}%", v.with_overrides({"differential.percent": float(p)})) for p in (0, 25, 50, 75, 100)],
        "zsampling": [(f"{variant} T={steps}", at(v.with_overrides({"zsampling.variant": variant}), steps))
                      for steps in (t, 2 * t) for variant in ("masked", "random", "recover")],
        # The paper's 1 − t^0.6 (root 0.6) and the best of each family on the 8×8 model first, so `rho:4`
        # answers whether the ranking moves with the token count; then the rest of the sweep.
        "rho": [(f"{fam} ρ={rho}", v.replace(schedule=fam, rho=rho))
                for fam, rho in (("root", 0.6), ("root", 2.0), ("pow", 0.4), ("root", 1.5), ("pow", 0.6),
                                 ("pow", 0.8), ("pow", 1.5), ("pow", 2.0), ("root", 0.4), ("root", 0.8))]
               + [("cosine", v), ("linear", v.replace(schedule="linear"))],
    }


def setting_key(config: SamplerConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def win_loss(ok: list[bool], reference: list[bool]) -> dict:
    wins = sum(r and not q for r, q in zip(ok, reference))
    losses = sum(q and not r for r, q in zip(ok, reference))
    decisive = wins + losses
    return {"wins": wins, "losses": losses, "ties": len(ok) - decisive, "win_rate": wins / decisive if decisive else 0.5}


def load_evaluations(path: Path, identity: dict, fresh: bool) -> dict[str, dict]:
    """Evaluations already in `path` (setting key → result), if the file is from the same model/n/split.

    A file of the earlier layout (rows only, no per-prompt outcomes) contributes its rows as
    evaluations whose wins/losses were computed then.
    """
    if fresh or not path.exists():
        return {}
    data = read_json(path)
    theirs = {k: data.get(k) for k in identity}
    theirs["split"] = theirs["split"] or "test"
    if "fingerprint" not in data:  # earlier layout: the model is named, not fingerprinted
        theirs["fingerprint"] = identity["fingerprint"] if data.get("model") == identity["model"] else None
    if theirs != identity:
        raise SystemExit(f"{path} holds results of another model, prompt count, split or kernels "
                         f"({theirs} ≠ {identity}); pass --fresh to start it over or --tag to write elsewhere")
    if "evaluations" in data:
        return data["evaluations"]
    out = {}
    for rows in data.get("groups", {}).values():
        for row in rows:
            try:
                config = SamplerConfig.from_dict(row["sampler"])
            except ValueError:
                continue  # a setting that no longer exists
            out[setting_key(config)] = {k: row[k] for k in ("accuracy", "per_category", "nfe", "seconds")} | {
                "ok": None, "legacy": {k: row[k] for k in ("wins", "losses", "ties", "win_rate", "vanilla_accuracy")}}
    return out


def table_rows(selected: dict, evaluations: dict, base: SamplerConfig) -> dict[str, list[dict]]:
    """Each group's rows that have been measured, with wins/losses against vanilla at the same steps."""
    out = {}
    for group, configs in selected.items():
        rows = []
        for label, cfg in configs:
            res = evaluations.get(setting_key(cfg))
            if res is None:
                continue
            ref = evaluations.get(setting_key(vanilla_at(base, cfg.num_steps)))
            if res["ok"] is not None and ref is not None and ref["ok"] is not None:
                versus = win_loss(res["ok"], ref["ok"]) | {"vanilla_accuracy": ref["accuracy"],
                                                           "paired_vs_vanilla": paired_difference(ref["ok"], res["ok"])}
            elif res.get("legacy"):
                versus = res["legacy"] | {"paired_vs_vanilla": None}
            else:
                continue
            rows.append({"label": label, "steps": cfg.num_steps, "sampler": cfg.to_dict(), **versus,
                         **{k: res[k] for k in ("accuracy", "per_category", "nfe", "seconds")},
                         "carried_over": bool(res.get("legacy"))})
        out[group] = rows
    return out


def vanilla_at(base: SamplerConfig, steps: int) -> SamplerConfig:
    return SamplerConfig.preset("vanilla", base=base, num_steps=steps)


def with_paired(data: dict) -> dict:
    """A results file's table rows (`groups`) with each row's paired difference against vanilla at the same steps,
    from the per-prompt verdicts of `evaluations` (None for a carried-over row, which has none).

    The rows are kept as written; an evaluation is found by its sampler settings as this code spells them now (the
    keys of an older file lack fields added since), and must agree with the row's wins and losses.
    """
    def current(config: dict) -> str | None:
        try:
            return setting_key(SamplerConfig.from_dict(config))
        except ValueError:
            return None  # a setting that no longer exists

    verdicts = {current(json.loads(key)): res.get("ok") for key, res in data["evaluations"].items()}
    base = SamplerConfig.from_dict(data["base_sampler"])
    groups = {}
    for group, rows in data["groups"].items():
        groups[group] = []
        for row in rows:
            ok = None if row["carried_over"] else verdicts.get(current(row["sampler"]))
            paired = paired_or_none(verdicts.get(setting_key(vanilla_at(base, row["steps"]))), ok)
            if paired is not None and (paired["b_only"], paired["a_only"]) != (row["wins"], row["losses"]):
                raise ValueError(f"{group} / {row['label']}: the verdicts found give {paired['b_only']} / "
                                 f"{paired['a_only']}, the row says {row['wins']} / {row['losses']}")
            groups[group].append({**row, "paired_vs_vanilla": paired})
    return {**data, "groups": groups}


def to_markdown(payload: dict) -> str:
    """The tables of a results file (its `groups` rows, as `with_paired` leaves them), groups in the default run
    order (the JSON keeps them sorted)."""
    order = list(groups(SamplerConfig()))
    rows = dict(sorted(payload["groups"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    lines = [f"ShapeBench {payload['split']} split, first n={payload['n']} prompts (balanced over categories), "
             f"CFG {payload['base_sampler']['guidance_scale']:g}, model: {payload['model']}", "",
             "Commands (each run adds the settings it lacks): " + "; ".join(f"`{c}`" for c in payload["commands"]), "",
             *([f"Kernels: {kernels_label(payload['kernels'])}", ""] if payload.get("kernels") else []),
             "Δ vs vanilla: paired accuracy difference on the same prompts and seeds, with its 95% interval "
             "(Newcombe's method 10).", ""]
    if any(r["carried_over"] for group in rows.values() for r in group):
        lines += ["Rows marked * were measured by an earlier run of this script on the same model and prompts "
                  "(before the results file kept per-prompt outcomes) and carried over unchanged.", ""]
    for group, group_rows in rows.items():
        if not group_rows:
            continue
        lines += [f"### {group}", "",
                  "| setting | steps | NFE | accuracy | vanilla (same steps) | wins / losses vs vanilla "
                  "| Δ vs vanilla [95% CI] |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['label']}{' *' if r['carried_over'] else ''} | {r['steps']} | {r['nfe']} | {r['accuracy']:.3f} | "
                  f"{r['vanilla_accuracy']:.3f} | {r['wins']} / {r['losses']} | {paired_cell(r['paired_vs_vanilla'])} |"
                  for r in group_rows]
        lines.append("")
    return "\n".join(lines)


def write_results(tag: str, payload: dict, selected: dict, base: SamplerConfig) -> None:
    data = {**payload, "groups": table_rows(selected, payload["evaluations"], base)}
    write_json(RESULTS / f"ablations_{tag}.json", data)
    atomic_write_text(RESULTS / f"ablations_{tag}.md", to_markdown(data))
    if sum(r["sampler"]["schedule"] in ("pow", "root") for r in data["groups"].get("rho", [])) >= 2:
        plot_rho(data["groups"]["rho"], RESULTS / f"ablations_{tag}_rho.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--tag", default="float", help="results go to benchmarks/results/ablations_<tag>.{json,md}")
    p.add_argument("--limit", type=int, default=None, help="first N ShapeBench prompts (balanced over categories)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--only", default=None, help="comma-separated groups, run in this order; GROUP:K runs the "
                   "group's first K rows. Groups: " + ",".join(groups(SamplerConfig())))
    p.add_argument("--redo", default="", help="comma-separated groups whose settings are measured again")
    p.add_argument("--fresh", action="store_true", help="discard the results file of this tag")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render", action="store_true",
                   help="only add the paired comparisons to ablations_<tag>.json and rewrite its Markdown "
                        "(no generation)")
    args = p.parse_args(argv)
    if args.render:
        data = with_paired(read_json(RESULTS / f"ablations_{args.tag}.json"))
        write_json(RESULTS / f"ablations_{args.tag}.json", data)
        atomic_write_text(RESULTS / f"ablations_{args.tag}.md", to_markdown(data))
        return 0
    torch.set_num_threads(args.threads)

    model = args.model or default_model()
    pipe = MGTPipeline.from_pretrained(model)
    base = pipe.settings.sampler
    every = groups(base)
    wanted = [item.partition(":") for item in args.only.split(",")] if args.only else [(g, "", "") for g in every]
    try:
        names = {group: int(k) if k else None for group, _, k in wanted}
    except ValueError:
        raise SystemExit(f"--only takes GROUP or GROUP:K (K an integer), got {args.only!r}") from None
    unknown = sorted((set(names) | {g for g in args.redo.split(",") if g}) - set(every))
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; choose from {list(every)}")

    path = RESULTS / f"ablations_{args.tag}.json"
    n = len(shapebench_prompts(DEFAULT_PER_CATEGORY, args.split)[: args.limit])
    # the folder's name, not its path: results files are shared; the fingerprint identifies the weights
    identity = {"model": args.model.name if args.model else "tiny-shapes (embedded)", "fingerprint": model_fingerprint(model),
                "n": n, "split": args.split, "kernels": describe_kernels(pipe.device)}
    evaluations = load_evaluations(path, identity, args.fresh)
    old = read_json(path) if path.exists() and not args.fresh else {}
    for group in filter(None, args.redo.split(",")):
        for _, cfg in every[group]:
            evaluations.pop(setting_key(cfg), None)
    command = "python benchmarks/ablations_sampler.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {**identity, "tag": args.tag, "base_sampler": base.to_dict(),
               "commands": list(dict.fromkeys(old.get("commands", [old["command"]] if "command" in old else [])
                                              + [command])),
               "evaluations": evaluations}
    # every group measured in the file stays in the tables, in the default order (a group whose only
    # measured row is the vanilla reference itself, such as rho's "cosine", is not shown unless asked for)
    measured = lambda c: setting_key(c) in evaluations and c != vanilla_at(base, c.num_steps)  # noqa: E731
    shown = {g: every[g] for g in every if g in names or any(measured(c) for _, c in every[g])}

    def measure(cfg: SamplerConfig, label: str, reference: bool = False) -> None:
        key = setting_key(cfg)
        if key in evaluations and not (reference and evaluations[key]["ok"] is None):
            return  # a reference needs per-prompt outcomes, which carried-over rows lack
        t0 = time.perf_counter()
        res = evaluate_pipeline(pipe, args.limit, cfg, progress=False, split=args.split)
        evaluations[key] = {"accuracy": res["overall"], "per_category": res["per_category"], "nfe": res["nfe"],
                            "ok": [bool(r["ok"]) for r in res["per_prompt"]], "seconds": time.perf_counter() - t0}
        assert res["n"] == n, (res["n"], n)
        write_results(args.tag, payload, shown, base)
        print(f"{label:48s} acc={res['overall']:.3f} NFE={res['nfe']} {time.perf_counter() - t0:.0f}s", flush=True)

    for group, first in names.items():
        for label, cfg in every[group][:first]:
            measure(vanilla_at(base, cfg.num_steps), f"[vanilla] T={cfg.num_steps}", reference=True)
            measure(cfg, f"[{group}] {label}")
    write_results(args.tag, payload, shown, base)
    return 0


def plot_rho(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for fam, marker in (("pow", "o"), ("root", "s")):
        pts = sorted((r["sampler"]["rho"], r["accuracy"]) for r in rows if r["sampler"]["schedule"] == fam)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label="(1−t)^ρ" if fam == "pow" else "1−t^ρ")
    for r in rows:
        if r["sampler"]["schedule"] in ("cosine", "linear"):
            ax.axhline(r["accuracy"], ls="--", lw=1, color="gray" if r["sampler"]["schedule"] == "cosine" else "k")
            ax.text(2.0, r["accuracy"], r["label"], fontsize=7, va="bottom", ha="right")
    ax.set_xlabel("ρ")
    ax.set_ylabel("ShapeBench accuracy")
    ax.set_title("Mask schedule sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
