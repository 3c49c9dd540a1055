"""torch.compile(fullgraph=True) of float and quantized MeissonicTransformer: no graph breaks, same output."""

import torch

from mgtq.models.presets import build_transformer
from mgtq.testing import micro_forward_inputs, quantized_micro_transformer


def test_no_graph_breaks_and_same_output():
    # The quantized model runs every float op of the float one too, plus both quantized layer kinds.
    model = quantized_micro_transformer()
    inputs = micro_forward_inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        eager = model(**inputs)
        # aot_eager traces through the fake (meta) kernels of mgtq's custom ops, as Inductor does.
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_default_tables_are_cached_per_grid_and_equal_a_rebuild():
    model = build_transformer("test-micro").eval()
    small, large = micro_forward_inputs(model, grid=4), micro_forward_inputs(model, grid=8)
    with torch.no_grad():
        first = model(**small)
        model(**large)
        assert {k[0] for k in model._table_cache} == {"rope", "micro"}
        assert sum(k[0] == "rope" for k in model._table_cache) == 2  # one per grid
        again = model(**small)
        model._table_cache.clear()
        rebuilt = model(**small)
    assert torch.equal(first, again) and torch.equal(first, rebuilt)
    assert not any("cache" in k for k in model.state_dict())


def test_tables_cached_in_inference_mode_serve_a_training_forward():
    model = build_transformer("test-micro")
    inputs = micro_forward_inputs(model, grid=4)
    with torch.inference_mode():
        model(**inputs)  # fills the cache
    model(**inputs).float().square().mean().backward()  # saves the cached tables for backward
    assert model.context_embedder.weight.grad is not None


def test_compile_blocks_same_output():
    model = quantized_micro_transformer()
    inputs = micro_forward_inputs(model)
    with torch.no_grad():
        eager = model(**inputs)
        model.compile_blocks(backend="aot_eager")
        compiled = model(**inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(quantized_micro_transformer().state_dict())  # compiled in place, same keys


def test_compile_blocks_with_the_onednn_weight_cache():
    # The opt-in cache's prepacked weights pass through the compiled blocks (custom op, fullgraph) and the
    # result is the eager cached model's within int8 rounding: Inductor's fused float ops differ from eager
    # in the last bits, which can flip an activation's int8 code at a rounding boundary (one step, 0.05).
    import pytest

    from mgtq.quantization import W4A8Linear
    from mgtq.quantization.qtensor import onednn_int8_linear_available

    if not onednn_int8_linear_available():
        pytest.skip("needs oneDNN's int8 linear (x86 CPU build)")
    model = quantized_micro_transformer()
    layers = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    assert layers
    for layer in layers:
        layer.enable_weight_cache("onednn")
    inputs = micro_forward_inputs(model)
    with torch.no_grad():
        eager = model(**inputs)
        model.compile_blocks()
        compiled = model(**inputs)
    assert all(layer.weight_cache == "onednn" for layer in layers)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


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


def test_compile_flags_on_generate_eval_bench():
    from mgtq.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "a red circle", "--compile"]).compile
    assert parser.parse_args(["eval", "--compile"]).compile
    assert parser.parse_args(["bench", "--compile"]).compile
    assert not parser.parse_args(["generate", "--prompt", "a red circle"]).compile
