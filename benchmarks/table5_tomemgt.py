"""The paper's Table 5 (TomeMGT) quality half on the embedded model: ShapeBench accuracy and token
agreement with the unmerged model at the same seeds, for merge ratios 0–0.75, float and SCQ.

    python benchmarks/table5_tomemgt.py --scq checkpoints/tiny-shapes-w4a8-scq [--limit N]

The latency half on the meissonic-1024 config is benchmarks/bench_tomemgt.py.
Writes benchmarks/results/table5_tomemgt.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mgtq.default_model import default_model
from mgtq.evaluation import evaluate_pipeline
from mgtq.merging import apply_tomemgt, remove_tomemgt
from mgtq.pipeline import MGTPipeline
from mgtq.utils import write_json

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.0, 0.25, 0.5, 0.75)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scq", type=Path, default=None, help="an exported SCQ checkpoint to measure too")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--blocks", default="joint,all")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"float": default_model()}
    if args.scq:
        models["SCQ W4A8"] = args.scq
    rows = []
    for name, path in models.items():
        pipe = MGTPipeline.from_pretrained(path)
        reference = evaluate_pipeline(pipe, args.limit, progress=False)
        rows.append({"model": name, "blocks": "-", "ratio": 0.0, "accuracy": reference["overall"],
                     "token_agreement": 1.0, "n": reference["n"]})
        for blocks in args.blocks.split(","):
            for ratio in RATIOS[1:]:
                apply_tomemgt(pipe, ratio, blocks=blocks)
                res = evaluate_pipeline(pipe, args.limit, progress=False, reference_tokens=reference["tokens"])
                remove_tomemgt(pipe)
                rows.append({"model": name, "blocks": blocks, "ratio": ratio, "accuracy": res["overall"],
                             "token_agreement": res["token_agreement"], "n": res["n"]})
                print(rows[-1], flush=True)
    payload = {"rows": rows, "sampler": pipe.settings.sampler.to_dict(),
               "command": "python benchmarks/table5_tomemgt.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json(RESULTS / "table5_tomemgt.json", payload)
    lines = [f"ShapeBench n={rows[0]['n']}; token agreement = fraction of tokens equal to the same model without "
             "merging at the same seeds.", "",
             "| model | merging blocks | ratio | ShapeBench acc. | token agreement |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['blocks']} | {r['ratio']} | {r['accuracy']:.3f} | {r['token_agreement']:.3f} |"
              for r in rows]
    (RESULTS / "table5_tomemgt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
