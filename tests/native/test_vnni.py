"""mgtq's AVX512-VNNI W4A8 GEMM (mgtq.native.amx.w4a8_vnni_linear): bit-equal to the torch reference and to
the AMX kernel, and where the dispatch chooses it.

The numerics tests need an x86-64 CPU with AVX512-VNNI (every AMX CPU has it) and a C++ compiler; the
dispatch is checked everywhere with forced contexts.
"""

import pytest
import torch

from mgtq.native import amx
from mgtq.quantization import W4A8Linear, kernels
from mgtq.quantization.kernels import KernelContext, choose_kernel
from mgtq.quantization.packing import pack_int4
from mgtq.quantization.qtensor import int8_int4_linear

needs_vnni = pytest.mark.skipif(not amx.vnni_available(), reason="needs an AVX512-VNNI CPU and a C++ compiler")


def ctx(m=2202, k=1024, n=1024, dtype=torch.bfloat16, **kw):
    kw = {"cpu_class": "avx512-vnni", "native": True, **kw}
    return KernelContext(device="cpu", m=m, k=k, n=n, dtype=dtype, group_size=k, **kw)


@pytest.mark.parametrize("context, expected", [
    (ctx(), "vnni"),
    (ctx(compiling=True), "vnni"),  # an opaque op under compile too, as the AMX kernel
    (ctx(m=2), "vnni"),  # few rows: the int4 weight read once per call either way
    (ctx(cpu_class="amx-bf16"), "vnni"),
    (ctx(native=False), "int_mm_chunked"),  # not built here
    (ctx(native=False, compiling=True), "int_mm_chunked_inline"),
    (ctx(n=96), "int_mm_chunked"),  # N % 64 != 0
    (ctx(k=96), "int_mm_chunked"),  # K % 128 != 0
    (ctx(dtype=torch.float16), "int_mm_chunked"),
    (ctx(cpu_class="avx2"), "int_mm_chunked"),  # no VNNI
    (ctx(cpu_class="amx-int8"), "amx"),  # the AMX kernel where AMX tiles are there
])
def test_choice(context, expected):
    assert choose_kernel("w4a8", context) == expected


def test_supported_shapes_and_chunks():
    assert amx.supports_vnni(1024, 4096, torch.bfloat16) and amx.supports_vnni(128, 64, torch.float32)
    assert not amx.supports_vnni(128, 32, torch.bfloat16) and not amx.supports_vnni(64, 64, torch.bfloat16)
    assert not amx.supports_vnni(128, 64, torch.float16)
    # about 1 MiB of unpacked weight per chunk, a multiple of 64 columns, never more than N
    assert amx.vnni_chunk_n(1024, 4096) == 1024 and amx.vnni_chunk_n(5120, 1024) == 192
    assert amx.vnni_chunk_n(1024, 128) == 128 and amx.vnni_chunk_n(1 << 16, 4096) == 64


def _operands(m, k, n, seed=0, low=-128, high=128):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(low, high, (m, k), dtype=torch.int8, generator=g)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    col_scale = torch.rand(n, generator=g) * 1e-3 + 1e-5
    bias = torch.randn(n, generator=g)
    return x_q, q, col_scale, bias


@needs_vnni
@pytest.mark.parametrize("m, k, n", [
    (1, 128, 64), (5, 128, 64), (6, 256, 128), (7, 128, 192), (100, 384, 64),
    (50, 4096, 640),  # three column chunks (256, 256, 128): chunk edges
    (70, 1024, 2560),  # three chunks (1024, 1024, 512)
])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bit_equal_to_the_reference(m, k, n, out_dtype, with_bias):
    x_q, q, col_scale, bias = _operands(m, k, n)
    bias = bias if with_bias else None
    packed = pack_int4(q)
    ref = int8_int4_linear(x_q, packed, col_scale, bias, out_dtype)
    got = amx.w4a8_vnni_linear(x_q, packed, col_scale, bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert torch.equal(got, ref)


@needs_vnni
def test_extreme_codes_sum_exactly():
    # vpdpbusd takes x + 128 as unsigned bytes; 128 * (column sum of 16q) comes off again. At the extremes
    # (x = -128 or 127, q = -8 or 7, K = 8192) the int32 sums must still be exact.
    k, n = 8192, 64
    x_q = torch.tensor([-128, 127], dtype=torch.int8).repeat(3, k // 2)
    x_q[1] = -128
    x_q[2] = 127
    q = torch.full((n, k), -8, dtype=torch.int8)
    q[1::2] = 7
    col_scale = torch.ones(n)
    got = amx.w4a8_vnni_linear(x_q, pack_int4(q), col_scale, None, torch.float32)
    exact = (x_q.double() @ (16 * q).double().t()) / 16
    assert torch.equal(got.double(), exact)


@needs_vnni
def test_threads_split_the_work_without_changing_a_bit():
    x_q, q, col_scale, bias = _operands(100, 1024, 1024)
    packed = pack_int4(q)
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(amx.w4a8_vnni_linear(x_q, packed, col_scale, bias, torch.bfloat16))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


@needs_vnni
def test_bf16_rounding_and_nan_as_torch():
    # The output rounding is written out (AVX512-BF16 is not part of the class): ties to even, NaN as torch's.
    x_q, q, _, _ = _operands(12, 128, 64)
    bias = torch.randn(64) * 1e3
    bias[3] = float("nan")
    bias[5] = float("inf")
    col_scale = torch.full((64,), 2.0 ** -9)  # sums on a fine grid: many exact bf16 ties
    packed = pack_int4(q)
    got = amx.w4a8_vnni_linear(x_q, packed, col_scale, bias, torch.bfloat16)
    ref = int8_int4_linear(x_q, packed, col_scale, bias, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@needs_vnni
def test_gelu_in_the_epilogue_as_the_amx_kernel():
    x_q, q, col_scale, bias = _operands(300, 1024, 512)
    packed = pack_int4(q)
    plain = amx.w4a8_vnni_linear(x_q, packed, col_scale, bias, torch.float32)
    fused = amx.w4a8_vnni_linear(x_q, packed, col_scale, bias, torch.bfloat16, "gelu_tanh")
    y = plain.double()
    exact = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))
    torch.testing.assert_close(fused.double(), exact, rtol=2 ** -8, atol=1e-6)
    if amx.available():  # the same epilogue code: the same bits
        assert torch.equal(fused, amx.w4a8_linear(x_q, packed, col_scale, bias, torch.bfloat16, "gelu_tanh"))
    with pytest.raises(ValueError, match="gelu_tanh"):
        amx.w4a8_vnni_linear(x_q, packed, col_scale, bias, torch.bfloat16, "relu")


@needs_vnni
def test_the_layer_runs_it_eager_and_compiled_and_equals_the_torch_kernel(monkeypatch):
    monkeypatch.setenv(kernels.CPU_CLASS_ENV, "avx512-vnni")  # this class's kernel on any VNNI machine
    torch.manual_seed(0)
    layer = W4A8Linear.from_float(torch.nn.Linear(256, 128), input_scale=0.02).eval()
    x = torch.randn(2, 40, 256, dtype=torch.bfloat16)
    assert choose_kernel("w4a8", kernels.context_for(x, 256, 128, 256)) == "vnni"
    with torch.inference_mode():
        native = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
        monkeypatch.setenv(kernels.CPU_CLASS_ENV, "avx2")  # torch's _int_mm path on the same machine
        assert choose_kernel("w4a8", kernels.context_for(x, 256, 128, 256)) == "int_mm_chunked"
        reference = layer(x)
    assert torch.equal(native, reference)
    assert torch.equal(compiled, reference)


def test_a_clear_error_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(amx, "_library", lambda: None)
    x_q, q, col_scale, bias = _operands(4, 128, 64)
    with pytest.raises(RuntimeError, match="AVX512-VNNI kernel is not available"):
        amx.w4a8_vnni_linear(x_q, pack_int4(q), col_scale, bias, torch.bfloat16)


@needs_vnni
def test_bad_operands_are_refused():
    x_q, q, col_scale, bias = _operands(4, 128, 64)
    packed = pack_int4(q)
    with pytest.raises(ValueError, match="N % 64"):
        amx.w4a8_vnni_linear(x_q, packed, col_scale, bias, torch.float16)
    with pytest.raises(ValueError, match="int8 x"):
        amx.w4a8_vnni_linear(x_q.float(), packed, col_scale, bias, torch.bfloat16)


def test_a_cpu_that_cannot_build_the_kernels_says_so_once(monkeypatch):
    import warnings

    from torch._inductor import codecache

    def no_compiler(cls, source):
        raise RuntimeError("simulated: no working C++ compiler")

    monkeypatch.setattr(amx, "_has_avx512_vnni", lambda: True)  # a CPU the kernels are for
    monkeypatch.setattr(codecache.CppCodeCache, "load", classmethod(no_compiler))
    amx._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"cannot be built here \(simulated: no working C\+\+ compiler\); "
                                                r"torch's kernels run instead.*Install a C\+\+ compiler"):
            assert amx._library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert amx._library() is None  # once a process: no second attempt, no second warning
    finally:
        amx._library.cache_clear()  # the real library again for the tests after this one
