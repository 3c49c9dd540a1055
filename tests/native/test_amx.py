"""mgtq's AMX GEMMs (mgtq.native.amx): W4A8 bit-equal to the torch reference, W4A16 on the same bf16
weights (on AMX tiles, and on AVX512-BF16 for CPUs without AMX), and where each is chosen.

The numerics tests need an AMX-int8 CPU (the AVX512-BF16 W4A16 one: an AVX512-BF16 CPU) with a C++ compiler
(what `torch.compile` on CPU needs too) and are skipped elsewhere; the dispatch is checked everywhere with forced
contexts.
"""

import pytest
import torch

from mgtq.native import amx
from mgtq.quantization import W4A8Linear, W4Linear, kernels
from mgtq.quantization.kernels import KernelContext, choose_kernel
from mgtq.quantization.packing import pack_int4
from mgtq.quantization.qtensor import dequantize_int4_weight, int8_int4_linear, quantize_int8_per_tensor

needs_amx = pytest.mark.skipif(not amx.available(), reason="needs an AMX-int8 CPU and a C++ compiler")
# Each W4A16 kernel version: its entry point and the CPU class whose dispatch picks it.
W4A16_VERSIONS = {"amx": (amx.w4a16_linear, "amx-int8"), "avx512": (amx.w4a16_avx512_linear, "avx512-vnni")}


@pytest.fixture(params=list(W4A16_VERSIONS))
def w4a16(request, monkeypatch):
    """A W4A16 kernel version (skipped where this CPU cannot run it), with MGTQ_CPU_CLASS forced to its class."""
    if request.param == "amx" and not amx.available():
        pytest.skip("needs an AMX-int8 CPU and a C++ compiler")
    if request.param == "avx512" and not amx.avx512_bf16_available():
        pytest.skip("needs an AVX512-BF16 CPU and a C++ compiler")
    monkeypatch.setenv(kernels.CPU_CLASS_ENV, W4A16_VERSIONS[request.param][1])
    return request.param


def ctx(m=2202, k=1024, n=1024, dtype=torch.bfloat16, group_size=None, **kw):
    kw = {"cpu_class": "amx-int8", "native": True, **kw}
    return KernelContext(device="cpu", m=m, k=k, n=n, dtype=dtype, group_size=group_size or k, **kw)


@pytest.mark.parametrize("context, expected", [
    (ctx(), "amx"),
    (ctx(compiling=True), "amx"),  # the one-pass quantizer op under compile too (Inductor's inline one is slower)
    (ctx(cache=True, compiling=True), "onednn"),  # ... also before the oneDNN cache
    (ctx(cache=True, compiling=True, native=False), "onednn_inline"),
    (ctx(m=17, k=128, n=32, dtype=torch.float32), "amx"),
    (ctx(native=False), "int_mm_chunked"),  # not built here (no compiler, no AMX permission)
    (ctx(cpu_class="avx512-vnni"), "vnni"),  # MGTQ_CPU_CLASS forced to another class: that class's kernel
    (ctx(cpu_class="avx2"), "int_mm_chunked"),
    (ctx(m=2), "amx"),  # few rows too: the weight read once as int4 (bench_linear_kernels' adaLN row)
    (ctx(m=2, k=96), "int_mm"),  # ... elsewhere one _int_mm
    (ctx(k=96), "int_mm_chunked"),  # K % 128 != 0
    (ctx(n=48), "int_mm_chunked"),  # N % 32 != 0
    (ctx(dtype=torch.float16), "int_mm_chunked"),  # the kernel stores bf16 or fp32 only
    (ctx(cache=True), "onednn"),  # the opt-in oneDNN weight cache, where the user made one
])
def test_choice(context, expected):
    assert choose_kernel("w4a8", context) == expected


def test_supported_shapes_and_chunks():
    assert amx.supports(1024, 4096, torch.bfloat16) and amx.supports(128, 32, torch.float32)
    assert not amx.supports(64, 32, torch.bfloat16) and not amx.supports(128, 16, torch.bfloat16)
    assert not amx.supports(128, 32, torch.float16)
    # about 1 MiB of unpacked weight per chunk, a multiple of 32 columns, never more than N
    assert amx.chunk_n(1024, 4096) == 1024 and amx.chunk_n(4096, 1024) == 256 and amx.chunk_n(5120, 1024) == 192
    assert amx.chunk_n(1024, 96) == 96 and amx.chunk_n(1 << 16, 4096) == 32


def _operands(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    col_scale = torch.rand(n, generator=g) * 1e-3 + 1e-5
    bias = torch.randn(n, generator=g)
    return x_q, pack_int4(q), col_scale, bias


@needs_amx
@pytest.mark.parametrize("m, k, n", [
    (1, 128, 32), (17, 128, 64), (33, 256, 96), (100, 384, 32),
    (50, 4096, 544),  # three column chunks (256, 256, 32): chunk edges
    (70, 1024, 2048),  # two chunks of 1024
])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bit_equal_to_the_reference(m, k, n, out_dtype, with_bias):
    x_q, packed, col_scale, bias = _operands(m, k, n)
    bias = bias if with_bias else None
    ref = int8_int4_linear(x_q, packed, col_scale, bias, out_dtype)
    got = amx.w4a8_linear(x_q, packed, col_scale, bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert torch.equal(got, ref)


@needs_amx
@pytest.mark.parametrize("m, k, n", [(40, 4096, 1024),  # four column chunks
                                     (100, 1024, 1024), (33, 1024, 64)])  # one chunk: its row blocks split
def test_threads_split_the_work_without_changing_a_bit(m, k, n):
    x_q, packed, col_scale, bias = _operands(m, k, n)
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(amx.w4a8_linear(x_q, packed, col_scale, bias, torch.bfloat16))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


@needs_amx
def test_the_layer_runs_it_and_equals_the_torch_kernel(monkeypatch):
    torch.manual_seed(0)
    float_layer = torch.nn.Linear(256, 96)
    layer = W4A8Linear.from_float(float_layer, input_scale=0.02).eval()
    x = torch.randn(2, 40, 256, dtype=torch.bfloat16)
    assert choose_kernel("w4a8", kernels.context_for(x, 256, 96, 256)) == "amx"
    with torch.inference_mode():
        native = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
        monkeypatch.setenv(kernels.CPU_CLASS_ENV, "avx2")  # torch's _int_mm path on the same machine
        assert choose_kernel("w4a8", kernels.context_for(x, 256, 96, 256)) == "int_mm_chunked"
        reference = layer(x)
    assert torch.equal(native, reference)
    assert torch.equal(compiled, reference)


def test_a_clear_error_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(amx, "_library", lambda: None)
    x_q, packed, col_scale, bias = _operands(4, 128, 32)
    with pytest.raises(RuntimeError, match="not available on this machine"):
        amx.w4a8_linear(x_q, packed, col_scale, bias, torch.bfloat16)


@needs_amx
def test_bad_operands_are_refused():
    x_q, packed, col_scale, bias = _operands(4, 128, 32)
    with pytest.raises(ValueError, match="K % 128"):
        amx.w4a8_linear(x_q, packed, col_scale, bias, torch.float16)
    with pytest.raises(ValueError, match="int8 x"):
        amx.w4a8_linear(x_q.float(), packed, col_scale, bias, torch.bfloat16)


@pytest.mark.skipif(not amx.vnni_available(), reason="needs an AVX512-VNNI CPU and a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 77, 128), (3, 37), (1, 5)])  # a 16-wide body and a scalar tail
def test_quantizer_equals_the_torch_one(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 8).to(dtype)
    scale = torch.tensor(0.05)
    flat = x.view(-1)
    # out of range both ways, and exact halves (round half to even)
    flat[:4] = torch.tensor([1e9, -1e9, 0.5 * 0.05, 2.5 * 0.05]).to(dtype)
    expected = quantize_int8_per_tensor(x, scale).reshape(-1, shape[-1])
    assert torch.equal(amx.quantize_int8(x, scale), expected)
    assert torch.equal(kernels.quantize_int8_rows(x, scale), expected)  # what every CPU W4A8 kernel runs


@pytest.mark.parametrize("context, expected", [
    (ctx(), "amx"),
    (ctx(m=2), "amx"),
    (ctx(compiling=True), "amx"),  # nothing for Inductor to fuse: the same op compiled
    (ctx(group_size=128), "amx"),
    (ctx(group_size=8), "dequant"),  # groups must hold whole 16-input vectors
    (ctx(dtype=torch.float32), "dequant"),  # AMX multiplies bf16 only: fp32 models keep the fp32 GEMM
    (ctx(native=False), "dequant"),
    (ctx(cpu_class="avx2"), "dequant_fp32"),
    (ctx(n=48), "dequant"),
    # AVX512-BF16 without AMX (AMD Zen 4): mgtq's vdpbf16ps kernel, eager and compiled
    (ctx(cpu_class="avx512-vnni", avx512_bf16=True), "avx512"),
    (ctx(cpu_class="amx-bf16", avx512_bf16=True), "avx512"),
    (ctx(cpu_class="avx512-vnni", avx512_bf16=True, m=2), "int8pack"),  # few rows: int8pack's GEMV was faster
    (ctx(cpu_class="avx512-vnni", avx512_bf16=True, m=2, group_size=128), "avx512"),
    (ctx(cpu_class="avx512-vnni", avx512_bf16=True, compiling=True), "avx512"),
    (ctx(cpu_class="avx512-vnni", avx512_bf16=True, n=96), "dequant"),  # N % 64 != 0: its register block
    (ctx(cpu_class="avx512-vnni", avx512_bf16=True, dtype=torch.float32), "dequant"),
    (ctx(cpu_class="avx512-vnni"), "dequant"),  # AVX512-VNNI without AVX512-BF16 (Cascade / Ice Lake)
    (ctx(cpu_class="avx512-vnni", avx512_bf16=True, native=False), "dequant"),
    (ctx(cpu_class="avx2", avx512_bf16=True), "dequant_fp32"),
])
def test_w4a16_choice(context, expected):
    assert choose_kernel("w4a16", context) == expected


@pytest.mark.parametrize("m, k, n, group", [(1, 128, 64, 64), (37, 256, 192, 64), (70, 1024, 576, None),
                                            (33, 4096, 64, 128), (100, 1024, 2048, None)])  # two column chunks
def test_w4a16_sums_the_dequantized_weights(m, k, n, group, w4a16):
    torch.manual_seed(0)
    float_layer = torch.nn.Linear(k, n)
    layer = W4Linear.from_float(float_layer, group_size=group) if group else W4Linear.from_float(float_layer)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    weight = dequantize_int4_weight(layer.weight_packed, layer.weight_scale, torch.bfloat16)
    exact = x.double() @ weight.double().t() + layer.bias.double()
    got = W4A16_VERSIONS[w4a16][0](x, layer.weight_packed, layer.weight_scale, layer.bias)
    # fp32 sums of the same bf16 products, rounded once to bf16: within one bf16 rounding of the exact result
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -8, atol=1e-3)
    assert choose_kernel("w4a16", kernels.context_for(x, k, n, group or k)) == w4a16
    with torch.inference_mode():
        assert torch.equal(layer(x), got)
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), got)


@pytest.mark.parametrize("m, k, n", [(40, 4096, 1024), (100, 1024, 1024), (33, 1024, 64)])
def test_w4a16_threads_split_the_work_without_changing_a_bit(m, k, n, w4a16):
    x_q, packed, col_scale, bias = _operands(m, k, n)
    x, scale = (x_q.float() / 64).bfloat16(), col_scale[:, None] * 100
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(W4A16_VERSIONS[w4a16][0](x, packed, scale, bias))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


def test_w4a16_avx512_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(amx, "_has_avx512_bf16", lambda: False)
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    packed, scale = torch.zeros(64, 64, dtype=torch.uint8), torch.ones(64, 1)
    with pytest.raises(RuntimeError, match="AVX512-BF16 kernels are not available"):
        amx.w4a16_avx512_linear(x, packed, scale, None)


@pytest.mark.skipif(not amx.avx512_bf16_available(), reason="needs an AVX512-BF16 CPU and a C++ compiler")
def test_w4a16_avx512_refuses_bad_operands():
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="N % 64"):
        amx.w4a16_avx512_linear(x, torch.zeros(32, 64, dtype=torch.uint8), torch.ones(32, 1), None)
    with pytest.raises(ValueError, match="bf16 x"):
        amx.w4a16_avx512_linear(x.float(), torch.zeros(64, 64, dtype=torch.uint8), torch.ones(64, 1), None)


def _gelu_exact(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))


@needs_amx
def test_gelu_in_the_epilogue():
    # The fp32 result's tanh-GELU before the one rounding: within one bf16 step of the exact GELU of the
    # unfused result (torch's own 0.5 y (1 + tanh u) loses digits to cancellation for negative y).
    x_q, packed, col_scale, bias = _operands(300, 1024, 512)
    plain = amx.w4a8_linear(x_q, packed, col_scale, bias, torch.float32)
    fused = amx.w4a8_linear(x_q, packed, col_scale, bias, torch.bfloat16, "gelu_tanh")
    torch.testing.assert_close(fused.double(), _gelu_exact(plain.double()), rtol=2 ** -8, atol=1e-6)
    with pytest.raises(ValueError, match="gelu_tanh"):
        amx.w4a8_linear(x_q, packed, col_scale, bias, torch.bfloat16, "relu")


def test_w4a16_gelu_in_the_epilogue(w4a16):
    x_q, packed, col_scale, bias = _operands(300, 1024, 512)
    x, scale = (x_q.float() / 64).bfloat16(), col_scale[:, None] * 100
    fn = W4A16_VERSIONS[w4a16][0]
    plain = fn(x, packed, scale, bias).float()  # no fp32 output here: rounded to bf16 once
    fused = fn(x, packed, scale, bias, "gelu_tanh")
    # the reference's pre-activation carries one bf16 rounding of its own
    torch.testing.assert_close(fused.double(), _gelu_exact(plain.double()), rtol=2 ** -7, atol=2e-3)
    with pytest.raises(ValueError, match="gelu_tanh"):
        fn(x, packed, scale, bias, "relu")
