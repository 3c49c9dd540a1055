"""W4Linear / W4A8Linear: numerics vs float references, dtypes, shapes, state dicts, meta device, bytes."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mgtq.quantization import (
    W4A8Linear,
    W4Linear,
    choose_int8_scale,
    dequantize_int4_weight,
    fake_quantize_int8_per_tensor,
    quantize_int4_weight,
    quantize_int8_per_tensor,
)

K, N = 128, 48


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(K, N)


def reference_weight(linear, group_size=None):
    q, s = quantize_int4_weight(linear.weight.detach(), group_size)
    g = K // s.shape[1]
    return (q.float().view(N, -1, g) * s[:, :, None]).reshape(N, K)


@pytest.mark.parametrize("group_size", [None, 32, 64])
def test_w4_matches_dequantized_reference(linear, group_size):
    m = W4Linear.from_float(linear, group_size=group_size)
    w = reference_weight(linear, group_size)
    assert torch.equal(m.dequantize_weight(torch.float32), w)
    x = torch.randn(2, 3, 7, K)  # arbitrary leading batch dims
    y = m(x)
    assert y.shape == (2, 3, 7, N)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias), rtol=1e-5, atol=1e-5)
    # and close to the float layer within int4 quantization error
    err = (y - linear(x)).abs().max()
    assert err < 0.1 * linear(x).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4_low_precision_inputs(linear, dtype):
    m = W4Linear.from_float(linear, group_size=32)
    x = torch.randn(5, K)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    ref = F.linear(x.to(dtype), reference_weight(linear, 32).to(dtype), linear.bias.to(dtype))
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_dequant_is_one_rounding_from_fp32(linear):
    q, s = quantize_int4_weight(linear.weight.detach(), 32)
    m = W4Linear.from_float(linear, group_size=32)
    for dtype in (torch.bfloat16, torch.float16):
        ref = reference_weight(linear, 32).to(dtype)
        assert torch.equal(dequantize_int4_weight(m.weight_packed, m.weight_scale, dtype, chunk_elems=7 * K), ref)


def test_w4a8_matches_integer_reference(linear):
    x = torch.randn(4, 33, K) * 2
    scale = choose_int8_scale(x.abs().max())
    m = W4A8Linear.from_float(linear, scale)
    w = reference_weight(linear)
    x_q = quantize_int8_per_tensor(x, scale)
    ref = F.linear(x_q.double() * scale.double(), w.double(), linear.bias.double())
    y = m(x)
    assert y.shape == (4, 33, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # same thing through the float fake-quant path
    torch.testing.assert_close(y, F.linear(fake_quantize_int8_per_tensor(x, scale), w, linear.bias), rtol=1e-5, atol=1e-5)
    # and close to the plain float layer within W4A8 quantization error
    f = linear(x)
    assert (y - f).abs().max() < 0.1 * f.abs().max()


def test_w4a8_bf16_and_chunking(linear):
    x = torch.randn(20, K).bfloat16()
    scale = choose_int8_scale(x.float().abs().max())
    m = W4A8Linear.from_float(linear, scale, chunk_n=16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    m_one = W4A8Linear.from_float(linear, scale, chunk_n=10**6)
    # chunking changes nothing: integer GEMM + per-column rescale
    assert torch.equal(y, m_one(x))
    ref = F.linear(fake_quantize_int8_per_tensor(x.float(), scale), reference_weight(linear), linear.bias)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_w4a8_clamps_outliers_and_small_m(linear):
    scale = torch.tensor(0.01)
    m = W4A8Linear.from_float(linear, scale)
    x = torch.randn(1, K) * 10  # far beyond 127 * 0.01: clamped
    ref = F.linear(torch.clamp(torch.round(x / scale), -128, 127) * scale, reference_weight(linear), linear.bias)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["int8", "onednn"])
def test_w4a8_weight_cache_is_optional_and_equal(linear, backend):
    from mgtq.quantization.qtensor import onednn_int8_linear_available

    if backend == "onednn" and not onednn_int8_linear_available():
        pytest.skip("needs the oneDNN weight cache (an x86 CPU build of torch 2.11 or newer)")
    m = W4A8Linear.from_float(linear, 0.02)
    x = torch.randn(9, K)
    y = m(x)
    m.enable_weight_cache(backend)
    assert m.weight_cache == backend and "_weight_times16" not in m.state_dict()
    assert m.weight_nbytes() == N * K // 2 + N * 4 + 4 + N * K
    if backend == "int8":
        assert torch.equal(m(x), y)  # same kernel, unpack skipped
    else:
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)  # fused epilogue rounds differently
        torch.testing.assert_close(m(x.bfloat16()).float(), y, rtol=1e-2, atol=2e-2)
    import copy

    assert copy.deepcopy(m).weight_cache in (None, "int8")  # oneDNN's opaque tensor is dropped
    m.disable_weight_cache()
    assert m.weight_cache is None and m.weight_nbytes() == N * K // 2 + N * 4 + 4


def test_w4a8_weight_cache_on_other_devices(linear):
    # "meta" stands for mps / xpu here: a device whose W4A8 kernel (fp32_exact) reads no cache.
    m = W4A8Linear.from_float(linear, 0.02)
    m.enable_weight_cache("int8")
    m.to("meta")
    assert m.weight_cache is None  # moved there: dropped, not carried along
    m.enable_weight_cache("auto")
    assert m.weight_cache is None and m.weight_nbytes() == N * K // 2 + N * 4 + 4
    with pytest.raises(ValueError, match="reads a weight cache"):
        m.enable_weight_cache("int8")
    cpu = W4A8Linear.from_float(linear, 0.02)
    cpu.enable_weight_cache("int8")
    cpu.to(torch.float64).to(torch.float32)  # staying on the CPU keeps it
    assert cpu.weight_cache == "int8"



def test_a_weight_cache_left_on_another_device_is_not_read(linear, monkeypatch):
    """Sequential offload moves a layer's parameters and buffers to the GPU for its forward, not the cached
    int8 copy: the kernel must not get a cache from another device than its input's."""
    from mgtq.quantization import kernels

    m = W4A8Linear.from_float(linear, 0.02)
    x = torch.randn(9, K)
    y = m(x)
    m.enable_weight_cache("int8")
    m._weight_times16 = m._weight_times16.to("meta")  # as if x and the parameters were on the GPU, it on the host
    seen = {}
    real = kernels.w4a8_linear
    monkeypatch.setattr(kernels, "w4a8_linear", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert torch.equal(m(x), y) and seen["weight_times16"] is None

def test_w4_small_m_path_matches_dequantized(linear):
    # <= SMALL_M rows take torch._weight_int8pack_mm on CPU; more rows dequantize + GEMM
    m = W4Linear.from_float(linear)
    w = reference_weight(linear)
    for rows in (1, 2, 16, 17):
        x = torch.randn(rows, K)
        torch.testing.assert_close(m(x), F.linear(x, w, linear.bias), rtol=1e-5, atol=1e-5)
        xb = x.bfloat16()
        ref = F.linear(xb.float(), w, linear.bias)
        torch.testing.assert_close(m(xb).float(), ref, rtol=2e-2, atol=2e-2)


def test_w4a8_rejects_groups():
    with pytest.raises(ValueError, match="per-output-channel"):
        W4A8Linear(K, N, group_size=32)


@pytest.mark.parametrize("cls", [W4Linear, W4A8Linear])
def test_state_dict_safetensors_round_trip(linear, cls, tmp_path):
    m = W4Linear.from_float(linear, group_size=32) if cls is W4Linear else W4A8Linear.from_float(linear, 0.05)
    sd = m.state_dict()
    expected_keys = {"weight_packed", "weight_scale", "bias"} | ({"input_scale"} if cls is W4A8Linear else set())
    assert set(sd) == expected_keys
    assert sd["weight_packed"].dtype == torch.uint8 and sd["weight_packed"].shape == (N, K // 2)
    save_file(sd, tmp_path / "layer.safetensors")
    loaded = load_file(tmp_path / "layer.safetensors")
    m2 = cls.from_state_dict(loaded)
    assert m2.weight_packed.device.type == "cpu" and m2.group_size == m.group_size
    x = torch.randn(3, K)
    assert torch.equal(m2(x), m(x))


def test_meta_construction_then_load(linear):
    m = W4Linear.from_float(linear)
    meta = W4Linear(K, N, bias=True, device="meta")
    assert meta.weight_packed.is_meta
    assert "group_size=128" in repr(meta)
    meta.load_state_dict(m.state_dict(), assign=True)
    x = torch.randn(2, K)
    assert torch.equal(meta(x), m(x))
    m8 = W4A8Linear(K, N, bias=False, device="meta")
    assert "input_scale=meta" in repr(m8)
    assert m8(torch.empty(3, K, device="meta")).shape == (3, N)


def test_scales_stay_fp32_through_to_dtype(linear):
    m = W4A8Linear.from_float(linear, 0.05).to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float32 and m.input_scale.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16
    assert m(torch.randn(2, K).bfloat16()).dtype == torch.bfloat16


def test_weight_nbytes_about_one_eighth():
    big = nn.Linear(1024, 512)
    m = W4Linear.from_float(big)
    fp32 = big.weight.numel() * 4
    assert m.weight_nbytes() == 512 * 512 + 512 * 4  # packed + per-channel fp32 scales
    assert 1 / 8 <= m.weight_nbytes() / fp32 < 1 / 8 * 1.01
    g = W4Linear.from_float(big, group_size=128)
    assert g.weight_nbytes() == 512 * 512 + 512 * 8 * 4
    assert W4A8Linear.from_float(big, 0.1).weight_nbytes() == m.weight_nbytes() + 4


def test_input_errors(linear):
    m = W4Linear.from_float(linear)
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(2, K + 2))
    for dtype in (torch.int64, torch.float64):
        with pytest.raises(TypeError, match="compute in float32, bfloat16 or float16"):
            m(torch.zeros(2, K, dtype=dtype))
    with pytest.raises(ValueError, match="divide"):
        W4Linear(K, N, group_size=48)


def test_packed_int4_weight_round_trip_and_mappings(linear):
    from mgtq.quantization import dequantize_int4_weight, pack_int4, unpack_int4
    from torchao.quantization.quant_primitives import MappingType

    q, scale = quantize_int4_weight(linear.weight.detach(), 32)
    packed = pack_int4(q)
    assert packed.shape == (N, K // 2) and scale.shape == (N, K // 32)
    assert torch.equal(dequantize_int4_weight(packed, scale), reference_weight(linear, 32))
    assert torch.equal(unpack_int4(packed), q) and int(q.min()) >= -8 and int(q.max()) <= 7
    q, s = quantize_int4_weight(linear.weight.detach(), None, MappingType.SYMMETRIC_NO_CLIPPING_ERR)
    w = q.float() * s
    assert (w - linear.weight).abs().max() <= 0.5 * s.max() + 1e-7  # no clipping: error <= half a step
    q2, s2 = quantize_int4_weight(linear.weight.detach(), None, "symmetric_no_clipping_err")  # by name
    assert torch.equal(q2, q) and torch.equal(s2, s)
    with pytest.raises(ValueError, match="symmetric"):
        quantize_int4_weight(linear.weight.detach(), None, MappingType.ASYMMETRIC)
