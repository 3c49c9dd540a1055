"""Kernel dispatch (mgtq.quantization.kernels): the choice table, each path's numerics, op counts.

The CUDA paths and the kernels of other devices are checked on CPU by forcing their branch
(`force_device="cuda"` / `"mps"`): the same torch ops run, with the CPU implementation of mgtq's fused custom
ops (the int8 quantizer's included: which tensors may take mgtq's CPU kernel is tested on its own). Tests marked
`cuda` run them on a GPU.
"""

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mgtq.quantization import W4A8Linear, W4Linear, quantize_int4_weight, quantize_int8_per_tensor
from mgtq.quantization import kernels, qtensor
from mgtq.quantization.kernels import KernelContext, choose_kernel, int_mm_supported
from mgtq.quantization.qtensor import dequantize_int4_weight, onednn_int8_linear_available

K, N = 128, 48
NO_ONEDNN = "needs the oneDNN weight cache (an x86 CPU build of torch 2.11 or newer)"


def ctx(device="cpu", m=2202, k=1024, n=1024, dtype=torch.bfloat16, group=None, **kw):
    return KernelContext(device=device, m=m, k=k, n=n, dtype=dtype, group_size=group or k, **kw)


@pytest.mark.parametrize("scheme, context, expected", [
    ("w4a16", ctx(m=2), "int8pack"),
    ("w4a16", ctx(m=2, group=64), "dequant"),
    ("w4a16", ctx(m=2, k=48), "dequant"),  # K % 32 != 0: torch's CPU int8pack kernel is unsafe there
    ("w4a16", ctx(m=17), "dequant"),
    ("w4a8", ctx(m=2), "int_mm"),
    ("w4a8", ctx(m=2202), "int_mm_chunked"),
    ("w4a8", ctx(m=2202, cache=True), "onednn"),
    ("w4a8", ctx(m=2202, cache=True, compiling=True), "onednn_inline"),
    ("w4a8", ctx(m=2, cache=True, compiling=True), "onednn_inline"),
    ("w4a8", ctx(m=2202, compiling=True), "int_mm_chunked_inline"),
    ("w4a8", ctx(m=2, compiling=True), "int_mm"),
    ("w4a16", ctx(m=2202, compiling=True), "dequant_inline"),
    ("w4a16", ctx(m=2, compiling=True), "int8pack"),
    ("w4a8", ctx("cuda", capability=(8, 0)), "int_mm"),
    ("w4a8", ctx("cuda", m=16, capability=(9, 0)), "int8pack_exact"),  # _int_mm needs M > 16
    ("w4a8", ctx("cuda", n=1020, capability=(8, 0)), "int8pack_exact"),  # ... and N % 8 == 0
    ("w4a8", ctx("cuda", capability=(6, 1)), "int8pack_exact"),
    ("w4a8", ctx("cuda", m=4, k=16384, capability=(9, 0)), "int8pack_exact"),  # fp32 sums exact up to K = 2**14
    ("w4a8", ctx("cuda", m=4, k=16416, capability=(9, 0)), "fp32_exact"),  # ... beyond: summed in pieces
    ("w4a8", ctx("cuda", capability=(8, 0), compiling=True), "int_mm_inline"),
    ("w4a8", ctx("cuda", m=16, capability=(8, 0), compiling=True), "int8pack_exact"),
    ("w4a16", ctx("cuda", capability=(8, 0), compiling=True), "dequant_inline"),
    ("w4a16", ctx("cuda", capability=(8, 0)), "dequant"),
    ("w4a16", ctx("cuda", capability=(8, 0), tinygemm=True), "tinygemm"),
    ("w4a16", ctx("cuda", dtype=torch.float16, capability=(8, 0), tinygemm=True), "dequant"),
    ("w4a16", ctx("cuda", capability=(7, 5), tinygemm=True), "dequant"),
    ("w4a16", ctx("cuda", m=4, capability=(8, 0)), "int8pack"),
])
def test_choice_table(scheme, context, expected):
    assert choose_kernel(scheme, context) == expected


@pytest.mark.parametrize("cls, compiling, rows, expected", [
    ("amx-int8", False, 2202, "onednn"), ("amx-int8", True, 2202, "onednn_inline"), ("amx-int8", False, 2, "onednn"),
    # elsewhere the cache is the plain int8 operand of the chunked _int_mm
    ("avx512-vnni", False, 2202, "int_mm_chunked"), ("avx512-vnni", True, 2202, "int_mm_chunked_inline"),
    ("amx-bf16", False, 2202, "int_mm_chunked"), ("amx-bf16", True, 2202, "int_mm_chunked_inline"),
    ("avx2", False, 2202, "int_mm_chunked"), ("avx2", True, 2202, "int_mm_chunked_inline"), ("avx2", False, 2, "int_mm"),
    # off x86 torch's _int_mm runs reference loops: exact sums through the fp32 GEMM, cache or not, at any row count
    ("generic", False, 2202, "fp32_exact"), ("generic", True, 2202, "fp32_exact"), ("generic", False, 2, "fp32_exact"),
])
def test_w4a8_choice_by_cpu_class_with_the_weight_cache(cls, compiling, rows, expected):
    cache = kernels.weight_cache_backend(cls) == "onednn"
    assert choose_kernel("w4a8", ctx(m=rows, cache=cache, compiling=compiling, cpu_class=cls)) == expected
    # a oneDNN cache forced onto another class is not used by the GEMM choice
    assert choose_kernel("w4a8", ctx(m=rows, cache=True, compiling=compiling, cpu_class=cls)) == expected


@pytest.mark.parametrize("cls, dtype, rows, compiling, expected", [
    ("avx2", torch.bfloat16, 2202, False, "dequant_fp32"), ("avx2", torch.bfloat16, 2202, True, "dequant_fp32"),
    ("avx2", torch.float16, 2202, False, "dequant_fp32"), ("avx2", torch.float32, 2202, False, "dequant"),
    ("avx2", torch.bfloat16, 2, False, "int8pack"),  # few rows: the weight read once as int8 still wins
    ("amx-int8", torch.bfloat16, 2202, False, "dequant"), ("amx-bf16", torch.bfloat16, 2202, True, "dequant_inline"),
    ("avx512-vnni", torch.bfloat16, 2202, False, "dequant"),
    ("generic", torch.bfloat16, 2202, False, "dequant_fp32"), ("generic", torch.float32, 2202, True, "dequant_inline"),
    ("generic", torch.bfloat16, 2, False, "int8pack"),
])
def test_w4a16_choice_by_cpu_class(cls, dtype, rows, compiling, expected):
    assert choose_kernel("w4a16", ctx(m=rows, dtype=dtype, compiling=compiling, cpu_class=cls)) == expected


def test_avx2_w4a16_multiplies_in_fp32(monkeypatch, layers):
    # On AVX2 the bf16 GEMM is emulated: dequantize to fp32, fp32 GEMM, one rounding of the output to bf16.
    linear, w4, _ = layers
    x = torch.randn(2, 40, K, dtype=torch.bfloat16)
    with torch.no_grad():
        native = w4(x)
        monkeypatch.setenv(kernels.CPU_CLASS_ENV, "avx2")
        assert choose_kernel("w4a16", kernels.context_for(x, K, N, K)) == "dequant_fp32"
        y = w4(x)
        ref = F.linear(x.float(), dequantize_int4_weight(w4.weight_packed, w4.weight_scale), w4.bias.float())
        compiled = torch.compile(w4, fullgraph=True)(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(compiled, y, rtol=2 ** -8, atol=1e-5)  # fp32 GEMM, Inductor's own order
    torch.testing.assert_close(y.float(), native.float(), rtol=2e-2, atol=2e-2)  # the bf16 path: bf16 noise


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}, "amx-int8"),
    ({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16"}, "amx-bf16"),
    ({"avx2", "avx512f", "avx512_vnni"}, "avx512-vnni"),
    ({"avx2", "avx512f"}, "avx2"),
    ({"avx2", "avx_vnni"}, "avx2"),
])
def test_cpu_class_from_flags_and_its_weight_cache(flags, expected):
    assert kernels.detect_cpu_class(flags, machine="x86_64") == expected
    assert kernels.weight_cache_backend(expected) == ("onednn" if expected == "amx-int8" else "int8")


@pytest.mark.parametrize("machine, expected", [
    ("aarch64", "generic"), ("arm64", "generic"), ("ppc64le", "generic"), ("AMD64", "avx512-vnni"),
    ("x86_64", "avx512-vnni"),
])
def test_a_cpu_that_is_not_x86_is_generic_whatever_its_flags_say(machine, expected):
    # an aarch64 /proc/cpuinfo has "Features", not "flags"; and torch's probes are x86 ones
    assert kernels.detect_cpu_class({"avx2", "avx512f", "avx512_vnni"}, machine=machine) == expected


@pytest.mark.parametrize("cls", kernels.CPU_CLASSES)
def test_forced_cpu_class_reaches_the_context_and_the_weight_cache(monkeypatch, layers, cls):
    monkeypatch.setenv(kernels.CPU_CLASS_ENV, cls)
    assert kernels.context_for(torch.randn(4, K), K, N, K).cpu_class == cls
    _, _, a8 = layers
    a8.enable_weight_cache("auto")
    expected = "onednn" if kernels.weight_cache_backend(cls) == "onednn" else "int8"
    if expected == "onednn" and not onednn_int8_linear_available():
        expected = "int8"
    assert a8.weight_cache == expected
    x = torch.randn(40, K)
    context = kernels.context_for(x, K, N, K, cache=a8.weight_cache == "onednn")
    assert choose_kernel("w4a8", context) == ("onednn" if expected == "onednn" else
                                              "fp32_exact" if cls == "generic" else "int_mm_chunked")
    torch.testing.assert_close(a8(x), _w4a8_reference(layers[0], x), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv(kernels.CPU_CLASS_ENV, "sse2")
    with pytest.raises(ValueError, match="MGTQ_CPU_CLASS"):
        kernels.cpu_class()
    with pytest.raises(ValueError, match="cpu_class"):
        ctx(cpu_class="sse2")


def test_cpu_isa_names_the_extensions_the_kernels_choose_between():
    from mgtq.native.cpu import cpu_isa

    assert cpu_isa({"fpu", "avx512_bf16", "avx2", "amx_int8", "sse4_2"}) == ["avx2", "avx512_bf16", "amx_int8"]
    assert cpu_isa(set()) == []


@pytest.mark.parametrize("cls", ["avx2", "avx512-vnni", "amx-int8", "generic"])
def test_describe_kernels_says_which_class_ran(monkeypatch, cls):
    # What a quality result records beside its figures: a forced class is what its kernels follow.
    from mgtq.native.cpu import cpu_flags, cpu_isa

    monkeypatch.setenv(kernels.CPU_CLASS_ENV, cls)
    described = kernels.describe_kernels("cpu")
    assert described["device"] == "cpu" and described["cpu_class"] == cls and described["torch"] == torch.__version__
    assert described["native"] == kernels.native_available(cls)
    assert described["isa"] == cpu_isa(cpu_flags())
    label = kernels.kernels_label(described)
    assert f"class {cls}" in label and ("mgtq's kernels" if described["native"] else "torch's kernels only") in label
    assert cls not in ("avx2", "generic") or not described["native"]  # no mgtq kernels: the label must not claim them


def test_kernels_label_of_a_gpu():
    described = {"device": "cuda", "torch": "2.13.0", "gpu": "NVIDIA H200", "capability": [9, 0]}
    assert kernels.kernels_label(described) == "cuda NVIDIA H200 (sm_90)"


def test_another_device_is_described_by_its_type_alone():
    # No CPU facts for a model on Apple's or Intel's GPUs: they run the same plain torch ops on any host.
    described = kernels.describe_kernels("meta")
    assert described == {"device": "meta", "torch": torch.__version__}
    assert kernels.kernels_label(described) == "meta (torch's ops)"


@pytest.mark.parametrize("device", ["mps", "xpu"])
@pytest.mark.parametrize("rows", [2, 2202])
@pytest.mark.parametrize("kw", [{}, {"compiling": True}, {"cache": True}, {"group": 64}])
def test_other_devices_run_plain_torch_ops(device, rows, kw):
    # mgtq's CPU kernels read host memory (a device pointer would be read as one), and torch's integer GEMMs are
    # CPU / CUDA ops: whatever the host CPU, another device gets the kernels made of plain torch ops.
    for cls in ("amx-int8", "avx512-vnni"):
        context = ctx(device, m=rows, cpu_class=cls, native=True, avx512_bf16=True, **kw)
        assert choose_kernel("w4a16", context) == "dequant"
        assert choose_kernel("w4a8", context) == "fp32_exact"


@pytest.mark.parametrize("rows", [2, 33])
def test_the_plain_w4a8_path_of_other_devices_is_the_int32_gemm_bit_for_bit(layers, rows):
    _, w4, a8 = layers
    x = torch.randn(rows, K, dtype=torch.bfloat16) * 3
    args = (x, a8.weight_packed, a8.weight_scale, a8.input_scale, a8.bias)
    with OpCounter() as counter:
        other = kernels.w4a8_linear(*args, force_device="mps")
    assert torch.equal(other, kernels.w4a8_linear(*args))  # the CPU's own kernel (int_mm / chunked / vnni)
    names = counter.names()
    assert "mm" in names, names  # torch.matmul's fp32 GEMM ...
    assert not {"_int_mm", "int8_int4_linear_chunked", "weight_int8pack_mm", "onednn_int8_linear", "w4a8_cpu",
                "w4a16_cpu"} & set(names), names  # ... and none of the CPU / CUDA integer kernels
    dequantized = dequantize_int4_weight(w4.weight_packed, w4.weight_scale, x.dtype)
    assert torch.equal(kernels.w4a16_linear(x, w4.weight_packed, w4.weight_scale, w4.bias, force_device="mps"),
                       F.linear(x, dequantized, w4.bias.to(x.dtype)))


def test_only_cpu_tensors_reach_the_native_quantizer():
    # It reads a tensor's memory from the host: another device's tensor must take the torch ops.
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert kernels._native_quantizer(x) == kernels.amx.vnni_available()
    assert not kernels._native_quantizer(x.to("meta"))
    assert not kernels._native_quantizer(x.float().double())


def test_exact_int_sums_past_the_fp32_bound():
    # Rows longer than fp32 can sum exactly go in pieces added in int32: the int64 reference's sums.
    g = torch.Generator().manual_seed(0)
    k = kernels.EXACT_FP32_MAX_K + 40
    x_q = torch.randint(-128, 128, (3, k), generator=g, dtype=torch.int8)
    q = torch.randint(-8, 8, (5, k), generator=g, dtype=torch.int8)
    x_q[0], q[0] = -128, -8
    x_q[0, -1], q[0, -1] = 127, -1  # an odd sum above 2**24: no fp32 holds it
    expected = x_q.long() @ q.long().t()
    assert int(expected[0, 0]) > 1 << 24 and int(expected[0, 0]) % 2
    assert int(torch.matmul(x_q.float(), q.float().t())[0, 0]) != int(expected[0, 0])  # no fp32 sum is exact
    assert torch.equal(kernels.exact_int_sums(x_q, q), expected.to(torch.int32))


def test_int_mm_capability_check():
    assert int_mm_supported((8, 0), "12.1") and int_mm_supported((9, 0), None)
    assert int_mm_supported((7, 5), "12.4") and not int_mm_supported((7, 5), "12.1")
    assert not int_mm_supported((6, 1), "12.4") and not int_mm_supported(None, "12.4")
    with pytest.raises(ValueError, match="scheme"):
        choose_kernel("w8a8", ctx())


@pytest.fixture
def layers():
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    return linear, W4Linear.from_float(linear), W4A8Linear.from_float(linear, 0.02)


def _w4a8_reference(linear, x, scale=0.02):
    q, s = quantize_int4_weight(linear.weight.detach())
    x_q = quantize_int8_per_tensor(x, torch.tensor(scale)).reshape(-1, K)
    acc = x_q.double() @ q.double().t()  # exact integers
    return (acc * (s[:, 0].double() * scale) + linear.bias.double()).float()


@pytest.mark.parametrize("rows", [2, 16, 33])
def test_w4a8_paths_agree(layers, rows):
    linear, _, a8 = layers
    x = torch.randn(rows, K)
    ref = _w4a8_reference(linear, x)
    args = (x, a8.weight_packed, a8.weight_scale, a8.input_scale, a8.bias)
    cpu = kernels.w4a8_linear(*args)
    cuda_path = kernels.w4a8_linear(*args, force_device="cuda")  # int_mm for 33 rows, int8pack_exact below
    torch.testing.assert_close(cpu, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cuda_path, ref, rtol=1e-6, atol=1e-6)


def test_small_m_exact_path_equals_int32_gemm(layers):
    # Integers accumulate exactly in fp32 (K <= 16384): the int32 GEMM's result, bit for bit.
    _, _, a8 = layers
    x = torch.randn(4, K) * 3
    exact = kernels.w4a8_linear(x, a8.weight_packed, a8.weight_scale, a8.input_scale, None, force_device="cuda")
    x_q = quantize_int8_per_tensor(x, a8.input_scale)
    acc = torch._int_mm(x_q, kernels.unpack_int4_times16_op(a8.weight_packed).t())
    int32 = kernels.rescale_acc(acc, a8.weight_scale, a8.input_scale, None, torch.float32, 1.0 / 16.0)
    assert torch.equal(exact, int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 40])
def test_w4a16_paths_agree(layers, dtype, rows):
    linear, w4, _ = layers
    x = torch.randn(rows, K, dtype=dtype)
    w = w4.dequantize_weight(torch.float32)
    ref = F.linear(x.float(), w, linear.bias)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for device in (None, "cuda"):
        y = kernels.w4a16_linear(x, w4.weight_packed, w4.weight_scale, w4.bias, force_device=device)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_references_equal_blocked_cpu_kernels(layers, dtype):
    # The CUDA kernels are compiled from these references; they must round exactly like the CPU code.
    _, w4, a8 = layers
    x = torch.randn(3, 50, K, dtype=dtype) * 4
    inv = torch.reciprocal(a8.input_scale)
    assert torch.equal(kernels._quantize_rows_ref(x, inv), quantize_int8_per_tensor(x, a8.input_scale).reshape(-1, K))
    packed, scale = w4.weight_packed, torch.rand(N, 4) + 0.1
    assert torch.equal(kernels._dequantize_ref(packed, scale, dtype), dequantize_int4_weight(packed, scale, dtype))


def test_tinygemm_operands_reproduce_the_weight():
    # tinygemm reads unsigned codes u = q + 8 with zero 0; torch's CPU sibling kernel shares that math.
    torch.manual_seed(1)
    w4 = W4Linear.from_float(nn.Linear(512, 64, bias=False))
    codes, scales_zeros, group = kernels.tinygemm_operands(w4.weight_packed, w4.weight_scale)
    assert group == 256 and scales_zeros.shape == (2, 64, 2) and int(codes.min()) >= 0 and int(codes.max()) <= 15
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    weight = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    y = torch._weight_int4pack_mm_for_cpu(x, weight, group, scales_zeros)
    ref = F.linear(x.float(), w4.dequantize_weight(torch.float32))
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.prepare_tinygemm(w4.weight_packed, w4.weight_scale)
    with pytest.raises(ValueError, match="sequential CPU offload"):  # its weights on "meta"
        kernels.prepare_tinygemm(w4.weight_packed.to("meta"), w4.weight_scale.to("meta"))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def names(self, views: bool = True) -> list[str]:
        return [str(op.overloadpacket.__name__) for op in self.ops if views or not op.is_view]


@pytest.mark.parametrize("scheme, rows, expected", [
    ("w4a8", 64, "int_mm"), ("w4a8", 2, "int8pack_exact"), ("w4a16", 64, "dequant"), ("w4a16", 2, "int8pack")])
def test_cuda_path_op_count(layers, scheme, rows, expected):
    _, w4, a8 = layers
    x = torch.randn(2, rows // 2, K, dtype=torch.bfloat16)
    assert choose_kernel(scheme, kernels.context_for(x, K, N, K, force_device="cuda")) == expected
    with OpCounter() as counter, torch.inference_mode():
        if scheme == "w4a8":
            kernels.w4a8_linear(x, a8.weight_packed, a8.weight_scale, a8.input_scale, a8.bias, force_device="cuda")
        else:
            kernels.w4a16_linear(x, w4.weight_packed, w4.weight_scale, w4.bias, force_device="cuda")
    names = counter.names()
    assert len(counter.names(views=False)) <= 6, names
    assert "constant_pad_nd" not in names and "pad" not in names
    if expected == "int_mm":
        assert names.count("_int_mm") == 1 and len(names) <= 6, names  # one GEMM, no chunks
        assert [n for n in names if n.startswith(("quantize_int8_rows", "rescale_acc"))] == [
            "quantize_int8_rows", "rescale_acc"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [2, 64])
def test_cuda_kernels_match_cpu(layers, rows):
    linear, w4, a8 = layers
    x = torch.randn(rows, K, dtype=torch.bfloat16)
    for module in (w4, a8):
        cpu = module(x)
        gpu = module.cuda()(x.cuda()).cpu()
        torch.testing.assert_close(gpu.float(), cpu.float(), rtol=2e-2, atol=2e-2)
        module.cpu()
    if torch.cuda.get_device_capability() >= (8, 0):
        w4big = W4Linear.from_float(nn.Linear(256, 64)).cuda()
        xb = torch.randn(40, 256, dtype=torch.bfloat16, device="cuda")
        ref = w4big(xb)
        w4big.prepare_tinygemm()
        with OpCounter() as counter:
            out = w4big(xb)
        assert "_weight_int4pack_mm" in counter.names(), counter.names()  # tinygemm ran, not the dequant path
        # tinygemm reads its scales in bf16: its weights are within one bf16 step of the dequant path's
        torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------- compiled CPU: what Inductor sees
def _dynamo_graph_targets(fn, *args) -> list[str]:
    targets = []

    def backend(gm, _inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return targets, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_paths_leave_quantize_and_dequantize_to_inductor(layers, dtype):
    # Opaque custom ops would stop Inductor from fusing these pointwise passes with their neighbours.
    _, w4, a8 = layers
    x = torch.randn(2, 40, K, dtype=dtype) * 3
    with torch.no_grad():
        for module, hidden in ((a8, "quantize_int8_rows"), (w4, "dequantize_int4")):
            targets, compiled = _dynamo_graph_targets(lambda t: module(torch.nn.functional.gelu(t)), x)
            assert not any(hidden in t for t in targets), targets
            eager = module(torch.nn.functional.gelu(x))
            assert torch.equal(compiled, eager)  # the same roundings, in the same order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiled_quantized_layers_equal_eager(layers, dtype):
    # Exactness of the fused code Inductor generates: int8 codes are the same (exact quantize), so
    # W4A8 equals eager bit for bit; W4A16 dequantizes to the same weight (one rounding) before the GEMM.
    _, w4, a8 = layers
    x = torch.randn(64, K, dtype=dtype) * 3
    torch._dynamo.reset()
    with torch.no_grad():
        for module in (a8, w4):
            # A neighbour to fuse into that rounds alike in both (compiled GELU differs from eager in the last bit).
            fn = lambda t: module(torch.relu(t) * 2)  # noqa: E731
            compiled = torch.compile(fn, fullgraph=True)(x)
            torch.testing.assert_close(compiled, fn(x), rtol=0, atol=0)


def test_where_this_torch_cannot_run_the_onednn_cache_auto_picks_int8_and_onednn_says_why(monkeypatch, layers):
    # torch < 2.11 has oneDNN's ops but fails at the first cached forward: never offered there
    monkeypatch.setenv(kernels.CPU_CLASS_ENV, kernels.ONEDNN_INT8_CLASSES[0])
    monkeypatch.setattr(qtensor, "_onednn_weight_cache_runs", lambda: False)
    _, _, a8 = layers
    assert not onednn_int8_linear_available()
    a8.enable_weight_cache("auto")
    assert a8.weight_cache == "int8"
    with pytest.raises(RuntimeError, match=r"oneDNN weight cache cannot be used: .*needs torch 2\.11 or newer"):
        a8.enable_weight_cache("onednn")


@pytest.fixture
def fresh_onednn_check():
    """`_onednn_weight_cache_runs` tried again (it is cached for the process), before and after the test."""
    qtensor._onednn_weight_cache_runs.cache_clear()
    yield qtensor._onednn_weight_cache_runs
    qtensor._onednn_weight_cache_runs.cache_clear()


def test_the_onednn_cache_check_runs_mgtq_s_op_on_a_prepacked_weight(monkeypatch, fresh_onednn_check):
    def opaque_refused(*args):  # torch 2.9 / 2.10 on a custom op's opaque argument
        raise NotImplementedError("Cannot access storage of OpaqueTensorImpl")

    monkeypatch.setattr(kernels, "onednn_int8_linear_op", opaque_refused)
    assert not fresh_onednn_check()
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        monkeypatch.undo()
        fresh_onednn_check.cache_clear()
        assert fresh_onednn_check() == (torch.__version__ >= (2, 11))  # the version only as the test's expectation


@pytest.mark.skipif(not onednn_int8_linear_available(), reason=NO_ONEDNN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [False, True])
def test_compiled_onednn_cache_reaches_onednn_and_equals_eager(monkeypatch, layers, dtype, native):
    # The prepacked oneDNN weight enters the compiled graph through one custom op (no graph break, no
    # freezing); activation quantization stays plain torch for Inductor to fuse, unless mgtq's AMX kernels
    # are built here: then their one-pass quantizer op (faster than Inductor's inline code).
    if native and not kernels.amx.available():
        pytest.skip("needs mgtq's AMX kernels (an AMX-int8 CPU and a C++ compiler)")
    # The class whose dispatch reads the oneDNN cache, whatever this machine is (oneDNN's int8 linear runs
    # on any x86 CPU; only the choice is the class's).
    monkeypatch.setenv(kernels.CPU_CLASS_ENV, kernels.ONEDNN_INT8_CLASSES[0])
    monkeypatch.setattr(kernels.amx, "available", lambda: native)
    linear, _, a8 = layers
    plain = W4A8Linear.from_float(linear, 0.02)
    a8.enable_weight_cache("onednn")
    x = torch.randn(2, 40, K, dtype=dtype) * 3
    fn = lambda t: a8(torch.relu(t) * 2)  # noqa: E731  (rounds alike compiled and eager)
    with torch.no_grad():
        targets, _ = _dynamo_graph_targets(fn, x)
        assert any("onednn_int8_linear" in t for t in targets), targets
        assert not any("int8_int4_linear_chunked" in t for t in targets), targets
        assert any("quantize_int8_rows" in t for t in targets) == native, targets
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)(x)
        eager = fn(x)
        uncached = plain(torch.relu(x) * 2)
    # Same int8 codes and the same oneDNN GEMM + epilogue: bit for bit.
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    # Against today's int4 path (int32 GEMM, fp32 rescale): the integer sums are exact, only the order of
    # the fp32 rescale may differ: one fp32 rounding (fp32), one bf16 rounding of the output (bf16).
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(compiled, uncached, rtol=tol, atol=tol)
    with torch.no_grad():
        torch.testing.assert_close(a8(x[0]), _w4a8_reference(linear, x[0]).to(dtype), rtol=tol, atol=tol)


@pytest.mark.skipif(not onednn_int8_linear_available(), reason=NO_ONEDNN)
def test_compiled_onednn_layers_share_one_graph():
    # Regional compilation compiles a block once for all blocks: the per-layer prepacked weights must be
    # graph inputs, not constants that Dynamo guards on (which would recompile for every layer).
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    mods = [W4A8Linear.from_float(nn.Linear(K, N), 0.02) for _ in range(3)]
    x = torch.randn(8, K)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for m in mods:
            m.enable_weight_cache("onednn")
            eager = m(x)
            m.compile(fullgraph=True)
            torch.testing.assert_close(m(x), eager, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [None, "onednn", "int8"])
def test_fused_activation_equals_the_activation_of_the_output(layers, dtype, cache):
    # forward(x, activation=...) is activation(forward(x)): applied to the fp32 result inside oneDNN's
    # epilogue (W4A8 with the oneDNN cache, W4A16 in bf16 on CPU), so within one rounding step of the
    # composition; every other kernel applies it to the output and is exactly the composition.
    _, w4, a8 = layers
    if cache == "onednn" and not onednn_int8_linear_available():
        pytest.skip(NO_ONEDNN)
    if cache is not None:
        a8.enable_weight_cache(cache)
    x = (torch.randn(2, 40, K) * 3).to(dtype)
    with torch.no_grad():
        for module in (a8, w4):
            plain = module(x)
            fused = module(x, activation="gelu_tanh")
            composed = F.gelu(plain, approximate="tanh")
            one_step = (cache == "onednn" and module is a8) or (dtype == torch.bfloat16 and module is w4)
            if one_step:
                torch.testing.assert_close(fused, composed, rtol=2 ** -7, atol=2 ** -7)
            else:
                assert torch.equal(fused, composed)
    with pytest.raises(ValueError, match="unknown activation"):
        a8(x, activation="relu")


@pytest.mark.skipif(not onednn_int8_linear_available(), reason=NO_ONEDNN)
def test_compiled_onednn_cache_fuses_the_activation_and_equals_eager(layers):
    _, _, a8 = layers
    a8.enable_weight_cache("onednn")
    x = torch.randn(2, 40, K, dtype=torch.bfloat16) * 3
    fn = lambda t: a8(torch.relu(t) * 2, activation="gelu_tanh")  # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True)(x)
        torch.testing.assert_close(compiled, fn(x), rtol=0, atol=0)


def test_a_fused_cuda_kernel_that_cannot_compile_falls_back_to_its_eager_reference(monkeypatch):
    """torch.compile is lazy: a backend that cannot compile (no Triton, no C compiler, an old GPU) fails at the
    first call, which must still return the reference's result, warn once, and use the reference from then on."""
    real_compile = torch.compile

    def no_compiler(gm, example_inputs):
        raise RuntimeError("simulated: no working Triton installation")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": no_compiler}))
    monkeypatch.setattr(kernels, "_COMPILED", {})
    x, inv = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), torch.tensor(10.0)
    with pytest.warns(RuntimeWarning, match="compiling the fused 'quantize' kernel failed"):
        out = kernels._fused("quantize", kernels._quantize_rows_ref)(x, inv)
    assert torch.equal(out, kernels._quantize_rows_ref(x, inv))
    assert kernels._COMPILED["quantize"] is kernels._quantize_rows_ref  # later calls go straight to it


def test_without_a_toolchain_every_fused_cuda_kernel_runs_its_reference_after_one_warning(monkeypatch):
    """No C compiler or Triton at all (CUDA on Windows, say): said once for every kernel, not once per kernel, and
    the kernels not yet called do not try to compile."""
    from torch._inductor.exc import InvalidCxxCompiler

    from mgtq import compilation

    real_compile, attempts = torch.compile, []

    def no_toolchain(gm, example_inputs):
        attempts.append(gm)
        raise InvalidCxxCompiler()  # (a message argument is accepted from torch 2.13 only)

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": no_toolchain}))
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setitem(compilation._TOOLCHAIN, "failure", None)
    x, inv = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), torch.tensor(10.0)
    acc, ws = torch.ones(4, 8, dtype=torch.int32), torch.rand(8, 1)
    with pytest.warns(RuntimeWarning, match="cannot build code on this machine") as said:
        out = kernels._fused("quantize", kernels._quantize_rows_ref)(x, inv)
        y = kernels._fused("rescale", kernels._rescale_ref)(acc, ws, inv, None, torch.float32, 1.0)
    assert len(said) == 1 and len(attempts) == 1
    assert torch.equal(out, kernels._quantize_rows_ref(x, inv))
    assert torch.equal(y, kernels._rescale_ref(acc, ws, inv, None, torch.float32, 1.0))
    assert kernels._COMPILED == {"quantize": kernels._quantize_rows_ref, "rescale": kernels._rescale_ref}


def test_a_fused_cuda_kernel_that_fails_to_compile_a_later_signature_falls_back_then(monkeypatch):
    """A graph is made whenever a call brings a new signature (here bf16 after fp32), so a backend can fail
    after the first call (Triton on a GPU without bf16, say): the reference answers that call and the ones after."""
    real_compile = torch.compile
    compiled = []

    def fails_on_bf16(gm, example_inputs):
        if any(getattr(t, "dtype", None) == torch.bfloat16 for t in example_inputs):
            raise RuntimeError("simulated: ptxas does not support bf16 on this GPU")
        compiled.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": fails_on_bf16}))
    monkeypatch.setattr(kernels, "_COMPILED", {})
    g = torch.Generator().manual_seed(0)
    x, inv = torch.randn(4, 64, generator=g), torch.tensor(10.0)
    def quantize(*args):  # as the custom op calls it
        return kernels._fused("quantize", kernels._quantize_rows_ref)(*args)

    assert torch.equal(quantize(x, inv), kernels._quantize_rows_ref(x, inv)) and len(compiled) == 1
    with pytest.warns(RuntimeWarning, match="compiling the fused 'quantize' kernel failed"):
        out = quantize(x.bfloat16(), inv)
    assert torch.equal(out, kernels._quantize_rows_ref(x.bfloat16(), inv))
    assert kernels._COMPILED["quantize"] is kernels._quantize_rows_ref


def test_a_fused_cuda_kernel_past_the_recompile_limit_runs_new_signatures_on_its_reference(monkeypatch):
    """Dynamo counts graphs per function and, under fullgraph=True, raises past its recompile limit (an error
    that is no TorchDynamoException): the signature past it runs the reference, those compiled before keep
    their graphs."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_PAST_LIMIT", set())
    torch._dynamo.reset()
    acc, ws, xs = torch.ones(4, 8, dtype=torch.int32), torch.rand(8, 1), torch.tensor(0.5)
    def rescale(*args):
        return kernels._fused("rescale", kernels._rescale_ref)(*args)

    calls = [(acc, ws, xs, None, dtype, 1.0) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    with torch._dynamo.config.patch(recompile_limit=2):
        for args in calls[:2]:
            assert torch.equal(rescale(*args), kernels._rescale_ref(*args))
        with pytest.warns(RuntimeWarning, match="recompile_limit"):
            out = rescale(*calls[2])
        assert torch.equal(out, kernels._rescale_ref(*calls[2]))
        assert kernels._PAST_LIMIT == {("rescale", *map(kernels._signature, calls[2]))}
        assert kernels._COMPILED["rescale"] is not kernels._rescale_ref  # the first two keep their graphs
        for args in calls:
            assert torch.equal(rescale(*args), kernels._rescale_ref(*args))
    torch._dynamo.reset()


def test_the_cuda_w4a8_under_torch_compile_gives_inductor_plain_ops_with_the_same_result(layers):
    # int_mm_inline: the int_mm kernel's steps as plain torch ops (no opaque mgtq op in the graph), same numbers.
    _, _, a8 = layers
    x = torch.randn(2, 20, K, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2)) * 3
    args = (a8.weight_packed, a8.weight_scale, a8.input_scale, a8.bias)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(t):
        return kernels.w4a8_linear(t, *args, force_device="cuda")

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(fn, backend=record, fullgraph=True)(x)
        eager = fn(x)
    torch._dynamo.reset()
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("_int_mm" in t for t in targets) and not any("mgtq" in t for t in targets), targets
    assert torch.equal(compiled, eager)


def test_a_fused_cuda_kernel_falls_back_where_torch_compile_refuses_at_once(monkeypatch):
    """Where torch.compile itself raises (a Python that Dynamo does not support), the reference runs, with a warning."""
    def refuse(fn, **kw):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    x, inv = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), torch.tensor(10.0)
    with pytest.warns(RuntimeWarning, match="Dynamo is not supported"):
        out = kernels._fused("quantize", kernels._quantize_rows_ref)(x, inv)
    assert torch.equal(out, kernels._quantize_rows_ref(x, inv))
