"""mgtq's attention (mgtq.native.amx.attention: on AMX tiles, or on AVX512-BF16 without AMX) and its dispatch
(mgtq.fused.attention).

The numerics: within the error of torch's own bf16 SDPA, both against SDPA in fp32 on the same bf16
inputs. Each numerics test runs per version of the kernel this CPU can run (AMX: an AMX-int8 CPU; AVX512:
a CPU with AVX512-BF16), with a C++ compiler, and is skipped elsewhere.
"""

import pytest
import torch
import torch.nn.functional as F

from mgtq import fused
from mgtq.native import amx

needs_amx = pytest.mark.skipif(not amx.available(), reason="needs an AMX-int8 CPU and a C++ compiler")


@pytest.fixture(params=[True, False], ids=["amx", "avx512"])
def tiles(request):
    """Which version of the kernel: AMX tiles, or AVX512-BF16 (skipped where this CPU cannot run it)."""
    if request.param and not amx.available():
        pytest.skip("needs an AMX-int8 CPU and a C++ compiler")
    if not request.param and not amx.avx512_bf16_available():
        pytest.skip("needs an AVX512-BF16 CPU and a C++ compiler")
    return request.param


def _inputs(b, h, sq, sk, d, bias=False, seed=0, bias_batch=None):
    g = torch.Generator().manual_seed(seed)
    # q and k as the model makes them: (B, S, H, D) storage seen as (B, H, S, D); v contiguous.
    q = torch.randn(b, sq, h, d, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(b, sk, h, d, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(b, h, sk, d, generator=g).bfloat16()
    key_bias = (torch.randn(bias_batch or b, 1, 1, sk, generator=g) * 2).bfloat16() if bias else None
    return q, k, v, key_bias


def _errors(q, k, v, key_bias, out):
    mask = None if key_bias is None else key_bias.float()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
    return (out.float() - ref).abs().max().item(), (torch_bf16.float() - ref).abs().max().item()


@pytest.mark.parametrize("b, h, sq, sk, d, bias", [
    (2, 8, 1101, 1101, 128, False),  # Meissonic-1024's joint attention
    (2, 8, 46, 1101, 128, False),  # a context-reuse local step: few queries, every cached key
    (1, 2, 5, 7, 32, False),  # fewer than one tile of queries and keys
    (2, 3, 77, 300, 64, True),  # a key bias (TomeMGT's proportional attention)
    (1, 1, 33, 65, 128, True),  # one past the tiles, both ways
    (3, 2, 64, 48, 96, False),
])
def test_matches_sdpa_within_its_own_error(b, h, sq, sk, d, bias, tiles):
    q, k, v, key_bias = _inputs(b, h, sq, sk, d, bias)
    out = amx.attention(q, k, v, key_bias, tiles=tiles)
    assert out.shape == (b, h, sq, d) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # (B, Sq, H, D) storage: the output projection's rows
    mine, torch_err = _errors(q, k, v, key_bias, out)
    assert mine <= 1.5 * torch_err + 1e-3, (mine, torch_err)


def test_bias_broadcast_over_batch_and_masked_keys(tiles):
    q, k, v, key_bias = _inputs(2, 2, 40, 70, 64, bias=True, bias_batch=1)
    mine, torch_err = _errors(q, k, v, key_bias, amx.attention(q, k, v, key_bias, tiles=tiles))
    assert mine <= 1.5 * torch_err + 1e-3
    # a key with bias -inf gets no weight: the result equals attention without that key
    key_bias = torch.zeros(2, 1, 1, 70, dtype=torch.bfloat16)
    key_bias[..., 13] = float("-inf")
    keep = [i for i in range(70) if i != 13]
    with_mask = amx.attention(q, k, v, key_bias, tiles=tiles)
    without = amx.attention(q, k[:, :, keep].contiguous(), v[:, :, keep].contiguous(), tiles=tiles)
    assert (with_mask.float() - without.float()).abs().max().item() <= 2e-2


def test_same_bits_at_any_thread_count(tiles):
    q, k, v, key_bias = _inputs(2, 3, 100, 150, 64, bias=True)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(amx.attention(q, k, v, key_bias, tiles=tiles))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_supported_inputs():
    q, k, v, _ = _inputs(1, 2, 8, 8, 64)
    assert amx.supports_attention(q, k, v, None)
    assert amx.supports_attention(q, k, v, torch.zeros(1, 1, 1, 8))
    assert not amx.supports_attention(q.float(), k.float(), v.float(), None)  # bf16 only
    assert not amx.supports_attention(q, k, v, torch.zeros(1, 1, 8, 8))  # a full mask: SDPA's job
    q48, k48, v48, _ = _inputs(1, 2, 8, 8, 48)
    assert not amx.supports_attention(q48, k48, v48, None)  # D % 32
    assert not amx.supports_attention(q, k[:, :, :4], v, None)  # k and v disagree
    assert not amx.supports_attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None)  # D strided


def test_unsupported_inputs_are_refused_with_the_reason():
    if not amx.available():
        with pytest.raises(RuntimeError, match="not available"):
            amx.attention(*_inputs(1, 1, 4, 4, 32)[:3])
        return
    q, k, v, _ = _inputs(1, 1, 4, 4, 48)
    with pytest.raises(ValueError, match="D % 32"):
        amx.attention(q, k, v)


def test_dispatch_falls_back_to_sdpa_exactly(monkeypatch):
    q, k, v, key_bias = _inputs(2, 2, 40, 40, 64, bias=True)
    monkeypatch.setenv("MGTQ_CPU_CLASS", "avx2")  # a class without mgtq's attention: torch's SDPA, bit for bit
    assert torch.equal(fused.attention(q, k, v, key_bias), F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias))
    monkeypatch.delenv("MGTQ_CPU_CLASS")
    q32, k32, v32 = q.float(), k.float(), v.float()  # fp32: SDPA
    bias32 = key_bias.float()
    assert torch.equal(fused.attention(q32, k32, v32, bias32),
                       F.scaled_dot_product_attention(q32, k32, v32, attn_mask=bias32))


def test_dispatch_keeps_autograd():
    q, k, v, _ = _inputs(1, 2, 16, 16, 64)
    q.requires_grad_(True)
    out = fused.attention(q, k, v)  # grad enabled and a leaf that wants it: SDPA, which has a backward
    out.float().sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_dispatch_runs_the_kernel_eager_and_compiled(monkeypatch, tiles):
    # each class's version: AMX tiles on amx-int8, AVX512-BF16 on avx512-vnni (forced where the CPU has both)
    monkeypatch.setenv("MGTQ_CPU_CLASS", "amx-int8" if tiles else "avx512-vnni")
    q, k, v, key_bias = _inputs(2, 2, 40, 50, 64, bias=True)

    def f(q, k, v, b):
        return fused.attention(q, k, v, b).transpose(1, 2).flatten(2)

    with torch.no_grad():
        eager = f(q, k, v, key_bias)
        compiled = torch.compile(f, fullgraph=True)(q, k, v, key_bias)
    assert torch.equal(eager, amx.attention(q, k, v, key_bias, tiles).transpose(1, 2).flatten(2))
    assert torch.equal(eager, compiled)


def test_rows_with_every_key_masked(tiles):
    q, k, v, _ = _inputs(2, 2, 20, 50, 64)
    key_bias = torch.zeros(2, 1, 1, 50)
    key_bias[1] = float("-inf")  # the second sample sees no key: zeros, as SDPA gives
    out = amx.attention(q, k, v, key_bias, tiles=tiles)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    mine, torch_err = _errors(q[:1], k[:1], v[:1], key_bias[:1], out[:1])
    assert mine <= 1.5 * torch_err + 1e-3
    # a finite "minus infinity" (finfo.min) on every key: every key equally unlikely, the mean of v (as SDPA)
    key_bias[1] = torch.finfo(torch.float32).min
    mine, torch_err = _errors(q, k, v, key_bias, amx.attention(q, k, v, key_bias, tiles=tiles))
    assert mine <= 1.5 * torch_err + 1e-3


def test_integer_or_bool_masks_are_not_taken():
    q, k, v, _ = _inputs(1, 2, 8, 8, 64)
    assert not amx.supports_attention(q, k, v, torch.ones(1, 1, 1, 8, dtype=torch.bool))
    assert not amx.supports_attention(q, k, v, torch.ones(1, 1, 1, 8, dtype=torch.int64))
