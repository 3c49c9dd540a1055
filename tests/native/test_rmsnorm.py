"""mgtq's one-pass RMSNorm (mgtq.native.amx.rms_norm) against diffusers' RMSNorm, and its dispatch
(mgtq.models.layers.RMSNorm). Numerics need an AVX512-BF16 CPU (AMX ones and AMD Zen 4 have it) with a C++
compiler and are skipped elsewhere."""

import pytest
import torch
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

from mgtq import fused
from mgtq.models.layers import RMSNorm
from mgtq.native import amx

needs_bf16 = pytest.mark.skipif(not amx.avx512_bf16_available(), reason="needs an AVX512-BF16 CPU and a C++ compiler")
EPS = 1e-6


def _pair(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mine, ref = RMSNorm(d, EPS).bfloat16(), DiffusersRMSNorm(d, EPS).bfloat16()
    with torch.no_grad():
        mine.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
        ref.weight.copy_(mine.weight)
    return mine, ref


def _ulps_apart(a, b):  # bf16 steps between a and b, elementwise
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@needs_bf16
@pytest.mark.parametrize("shape", [(2, 64, 64, 1024), (2, 77, 1024), (3, 5, 32), (16,)])
def test_within_one_ulp_of_diffusers(shape):
    mine, ref = _pair(shape[-1])
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    with torch.inference_mode():
        assert fused.native_rms_norm(x, mine.weight)
        y, expected = mine(x), ref(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    apart = _ulps_apart(y, expected)
    # only the sum of squares adds in another order; a one-step change of the rounded normed value can become
    # two after the product with the weight (diffusers rounds twice, and so does the kernel)
    assert apart.max() <= 2 and (apart > 0).float().mean() < 1e-4


@needs_bf16
def test_same_bits_at_any_thread_count():
    mine, _ = _pair(256)
    x = torch.randn(4, 33, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(amx.rms_norm(x, mine.weight, EPS))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_what_the_kernel_takes():
    w = torch.ones(64, dtype=torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    assert amx.supports_rms_norm(x, w)
    assert not amx.supports_rms_norm(x.float(), w)  # fp32 activations
    assert not amx.supports_rms_norm(x, w.float())  # an fp32 weight makes diffusers return fp32
    assert not amx.supports_rms_norm(torch.randn(3, 40).bfloat16(), torch.ones(40, dtype=torch.bfloat16))  # D % 16
    assert not amx.supports_rms_norm(torch.randn(64, 3).bfloat16().t(), w)  # rows not dense
    if amx.avx512_bf16_available():
        with pytest.raises(ValueError, match="contiguous bf16"):
            amx.rms_norm(x.float(), w, EPS)


@pytest.mark.parametrize("case", ["fp32", "strided", "grad", "avx2 class"])
def test_falls_back_to_diffusers_bit_exact(case, monkeypatch):
    mine, ref = _pair(128)
    x = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    if case == "fp32":
        mine, ref, x = mine.float(), ref.float(), x.float()
    elif case == "strided":
        x = torch.randn(2, 128, 10).bfloat16().transpose(1, 2)
    elif case == "grad":
        x.requires_grad_(True)
    else:
        monkeypatch.setenv("MGTQ_CPU_CLASS", "avx2")  # every mgtq kernel off
    assert not fused.native_rms_norm(x, mine.weight)
    y = mine(x)
    assert torch.equal(y, ref(x))
    if case == "grad":
        y.float().sum().backward()
        assert x.grad is not None
