"""benchmarks/bench_goals.py: which goals a bench JSON meets, compiled weight-cache rows included."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_goals.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_goals", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_compiled_cached_goals_read_the_round_medians():
    bench_goals = _script()
    spread = {"min": 0.7, "max": 0.9, "rounds": 5}
    report = {"results": [], "ratios": {
        "w4a8-cached+compile": {"forward_vs_bf16": 0.82, "forward_vs_bf16_spread": spread},
        "scq-cached+compile": {"forward_vs_bf16": 0.74},
    }}
    rows = {g["name"]: g for g in bench_goals.goals(report)}
    assert set(rows) == {"compile_w4a8-cached_forward", "compile_scq-cached_forward"}
    w4a8, scq = rows["compile_w4a8-cached_forward"], rows["compile_scq-cached_forward"]
    assert (w4a8["value"], w4a8["target"], w4a8["met"], w4a8["spread"]) == (0.82, 0.60, False, spread)
    assert scq["met"] and scq["target"] == 0.75
    assert "compiled w4a8-cached forward / compiled bf16" in bench_goals.to_markdown(list(rows.values()))
