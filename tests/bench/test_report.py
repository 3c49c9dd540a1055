"""mgtq.bench.report: ratios between cases of one bench run."""


def test_bench_compile_cases_compare_with_compiled_bf16():
    from mgtq.bench.config import BenchConfig
    from mgtq.bench.report import compute_ratios
    from mgtq.bench.result import CaseResult

    labels = [c.label for c in BenchConfig(formats=("bf16", "scq"), compile=True).cases()]
    assert labels == ["bf16", "scq", "bf16+compile", "scq+compile"]

    def result(label, forward):
        target = label.split("+")[0]
        return CaseResult(label=label, target=target, kind="mgtq", compile=label.endswith("+compile"),
                          latency={"forward": {"median": forward}, "image": None})

    ratios = compute_ratios([result("bf16", 10.0), result("scq", 12.0), result("bf16+compile", 5.0),
                             result("scq+compile", 4.0)])
    assert ratios["scq+compile"]["forward_vs_bf16"] == 0.8  # against compiled bf16, not eager
    assert ratios["bf16+compile"]["forward_speedup_vs_eager"] == 2.0
