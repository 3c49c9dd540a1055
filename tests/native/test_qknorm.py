"""mgtq's one-pass QK-norm + RoPE (mgtq.native.amx.qknorm_rope) against QKNorm's torch chain, and its dispatch
(mgtq.fused.qk_norm_rope). Numerics need an AVX512-BF16 CPU (AMX ones and AMD Zen 4 have it) with a C++
compiler and are skipped elsewhere."""

import pytest
import torch

from mgtq import fused
from mgtq.models.transformer import QKNorm, apply_rope, rope_tables
from mgtq.native import amx

needs_bf16 = pytest.mark.skipif(not amx.avx512_bf16_available(), reason="needs an AVX512-BF16 CPU and a C++ compiler")
EPS = 1e-6


def _inputs(b=2, n=300, h=8, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the heads view of a projection's output, as Attention._heads makes it
    x = (torch.randn(b, n, h * d, generator=g) * 3).bfloat16().unflatten(-1, (h, d)).transpose(1, 2)
    side = int(n ** 0.5) + 1
    ids = torch.zeros(n, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n) // side, torch.arange(n) % side
    axes = (d // 8, d * 7 // 16, d - d // 8 - d * 7 // 16)
    cos, sin = rope_tables(ids, axes)
    weight = (1 + 0.1 * torch.randn(d, generator=g)).bfloat16()
    return x, weight, cos, sin


def _chain(x, weight, cos, sin, monkeypatch):
    monkeypatch.setenv("MGTQ_CPU_CLASS", "avx2")  # the torch chain
    try:
        return fused.qk_norm_rope(x, weight, EPS, cos, sin)
    finally:
        monkeypatch.delenv("MGTQ_CPU_CLASS")


def _ulps_apart(a, b):  # bf16 steps between a and b, elementwise
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@needs_bf16
@pytest.mark.parametrize("b, n, h, d", [(2, 300, 8, 128), (1, 5, 2, 32), (3, 77, 4, 64)])
def test_within_one_ulp_of_the_torch_chain(b, n, h, d, monkeypatch):
    x, weight, cos, sin = _inputs(b, n, h, d)
    mine = amx.qknorm_rope(x, weight, EPS, cos, sin)
    ref = _chain(x, weight, cos, sin, monkeypatch)
    assert mine.stride() == x.stride()  # the heads layout kept: no copy on the way to attention
    apart = _ulps_apart(mine, ref)
    assert apart.max() <= 1 and (apart > 0).float().mean() < 1e-3  # only the sum of squares adds in another order


@needs_bf16
def test_per_sample_tables(monkeypatch):
    x, weight, cos, sin = _inputs(b=2, n=40, h=2, d=64)
    cos3, sin3 = cos.expand(2, 40, 64).clone(), sin.expand(2, 40, 64).clone()
    cos3[1], sin3[1] = cos3[1] * 0.6, sin3[1] * 0.8  # merged tokens carry means of their members' tables
    apart = _ulps_apart(amx.qknorm_rope(x, weight, EPS, cos3, sin3), _chain(x, weight, cos3, sin3, monkeypatch))
    assert apart.max() <= 1


@needs_bf16
def test_module_path_matches_the_composed_functions():
    x, weight, cos, sin = _inputs(b=1, n=64, h=2, d=128)
    norm = QKNorm(128, eps=EPS).to(torch.bfloat16)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        fused_out = norm(x, (cos, sin))
        composed = apply_rope(torch.nn.functional.rms_norm(x.float(), (128,), weight.float(), EPS), cos, sin)
    assert (fused_out.float() - composed.float()).abs().max() <= 2 ** -6 * composed.float().abs().max()


def test_supported_inputs():
    x, weight, cos, sin = _inputs(b=1, n=8, h=2, d=32)
    assert amx.supports_qknorm_rope(x, weight, cos, sin)
    assert not amx.supports_qknorm_rope(x.float(), weight, cos, sin)  # bf16 only
    assert not amx.supports_qknorm_rope(x, weight, cos.double(), sin.double())  # fp32 tables
    assert not amx.supports_qknorm_rope(x, weight, cos[:4], sin[:4])  # one row per token
    x24, w24, c24, s24 = _inputs(b=1, n=8, h=2, d=24)
    assert not amx.supports_qknorm_rope(x24, w24, c24, s24)  # D % 16


@needs_bf16
def test_compiled_module_runs_the_kernel():
    x, weight, cos, sin = _inputs(b=2, n=40, h=2, d=64)
    norm = QKNorm(64, eps=EPS).to(torch.bfloat16).requires_grad_(False)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        eager = norm(x, (cos, sin))
        compiled = torch.compile(norm, fullgraph=True)(x, (cos, sin))
    assert torch.equal(eager, amx.qknorm_rope(x, weight, EPS, cos, sin)) and torch.equal(eager, compiled)


def test_autograd_takes_the_composition():
    x, weight, cos, sin = _inputs(b=1, n=8, h=2, d=32)
    x = x.detach().requires_grad_(True)
    assert not fused.native_qk_norm_rope(x, weight, cos, sin)  # the kernel has no backward
    norm = QKNorm(32, eps=EPS).to(torch.bfloat16)
    norm(x, (cos, sin)).float().sum().backward()  # the module composes RMSNorm and RoPE when grads flow
    assert x.grad is not None and norm.weight.grad is not None
