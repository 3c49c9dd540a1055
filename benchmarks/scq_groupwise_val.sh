#!/usr/bin/env bash
# A few points of issue 18 on ShapeBench's val split (first 80 prompts), 1 thread, all in one run:
# group-64 A16 + lowest-magnitude third on A8 (recipes/tiny-shapes-w4g64a8-scq.yaml) against the default
# SCQ recipe (per-channel everywhere) and the float model.
#
#   benchmarks/scq_groupwise_val.sh BASE_RUN [WORK]
#
# BASE_RUN: a finished `mgtq calibrate` run of the default recipe (exported here as the default SCQ
# checkpoint); its folder is copied so the synthesized calibration set is reused (the synth stage's
# fingerprint is the same), everything after it re-runs. Results: benchmarks/results/scq_groupwise_val/.
# A result file that exists is kept (the script resumes).
set -euo pipefail
BASE_RUN=$1; WORK=${2:-runs/scq-groupwise-val}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RESULTS=benchmarks/results/scq_groupwise_val
mkdir -p "$WORK" "$RESULTS"
mgtq() { PYTHONPATH=$PWD python -m mgtq.cli "$@"; }
EVAL=(eval --split val --limit 80 --device cpu --no-progress)

if [ ! -d "$WORK/calib-g64" ]; then cp -r "$BASE_RUN" "$WORK/calib-g64"; rm -f "$WORK/calib-g64/.lock"; fi
mgtq calibrate --recipe recipes/tiny-shapes-w4g64a8-scq.yaml --out "$WORK/calib-g64" --restart --no-progress
[ -d "$WORK/g64" ] || mgtq export "$WORK/calib-g64" --out "$WORK/g64"
[ -d "$WORK/default" ] || mgtq export "$BASE_RUN" --out "$WORK/default"
[ -f "$RESULTS/g64_lowest_third.json" ] || mgtq "${EVAL[@]}" --model "$WORK/g64" --json "$RESULTS/g64_lowest_third.json"
[ -f "$RESULTS/default_scq.json" ] || mgtq "${EVAL[@]}" --model "$WORK/default" --json "$RESULTS/default_scq.json"
[ -f "$RESULTS/fp32.json" ] || mgtq "${EVAL[@]}" --json "$RESULTS/fp32.json"
# group-64 A16 with the measured-sensitivity third on A8 (the same recipe but secondary.selection)
sed 's/^  selection: lowest.*/  selection: sensitivity/' recipes/tiny-shapes-w4g64a8-scq.yaml > "$WORK/g64-sensitivity.yaml"
if [ ! -d "$WORK/calib-g64-sens" ]; then cp -r "$BASE_RUN" "$WORK/calib-g64-sens"; rm -f "$WORK/calib-g64-sens/.lock"; fi
mgtq calibrate --recipe "$WORK/g64-sensitivity.yaml" --out "$WORK/calib-g64-sens" --restart --no-progress
[ -d "$WORK/g64-sens" ] || mgtq export "$WORK/calib-g64-sens" --out "$WORK/g64-sens"
[ -f "$RESULTS/g64_sensitivity_third.json" ] || mgtq "${EVAL[@]}" --model "$WORK/g64-sens" --json "$RESULTS/g64_sensitivity_third.json"
python benchmarks/scq_groupwise_val_table.py "$RESULTS"
