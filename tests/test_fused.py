"""mgtq.fused: activation names, the oneDNN float linear and when it runs (plain bf16 CPU inference only)."""

import pytest
import torch
import torch.nn.functional as F

import mgtq.fused
from mgtq.fused import apply_activation, float_linear, onednn_post_op

ONEDNN = pytest.mark.skipif(not (mgtq.fused._X86 and torch._C._has_mkldnn),
                            reason="oneDNN's linear runs on x86 builds with mkldnn only")


def _operands(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 9, 64, generator=g) * 2).to(dtype)
    return x, (torch.randn(32, 64, generator=g) / 8).to(dtype), torch.randn(32, generator=g).to(dtype)


def _ops(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


def test_activation_names():
    assert onednn_post_op(None) == ("none", "") and onednn_post_op("gelu_tanh") == ("gelu", "tanh")
    x = torch.randn(5)
    assert torch.equal(apply_activation(x, None), x)
    assert torch.equal(apply_activation(x, "gelu_tanh"), F.gelu(x, approximate="tanh"))
    for bad in ("relu", "gelu"):
        with pytest.raises(ValueError, match="unknown activation"):
            onednn_post_op(bad)
        with pytest.raises(ValueError, match="unknown activation"):
            float_linear(*_operands(torch.float32), bad)


@ONEDNN
def test_plain_bf16_inference_runs_onednn_within_one_rounding():
    x, w, b = _operands()
    y, ops = _ops(lambda: float_linear(x, w, b, "gelu_tanh"))
    assert "mkldnn::_linear_pointwise" in ops
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-2)


def test_what_oneDNN_cannot_take_stays_on_f_linear():
    x, w, b = _operands()
    # A trainable bias alone (BitFit): oneDNN's op has no autograd, the bias must still get its gradient.
    bias = b.clone().requires_grad_()
    y, ops = _ops(lambda: float_linear(x, w, bias))
    assert "mkldnn::_linear_pointwise" not in ops
    y.float().sum().backward()
    assert bias.grad is not None

    class Wrapped(torch.Tensor):  # a tensor subclass (torchao's quantized weights, DTensor) dispatches itself
        pass

    sub = torch.Tensor._make_subclass(Wrapped, w)
    y, ops = _ops(lambda: float_linear(x, sub, b))
    assert "mkldnn::_linear_pointwise" not in ops
    assert torch.equal(y.as_subclass(torch.Tensor), F.linear(x, w, b))
    # fp32: F.linear itself (MKL's sgemm was the faster one)
    xf, wf, bf = _operands(torch.float32)
    assert torch.equal(float_linear(xf, wf, bf, "gelu_tanh"), F.gelu(F.linear(xf, wf, bf), approximate="tanh"))
