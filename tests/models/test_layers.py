"""mgtq.models.layers: the float Linear (oneDNN path, fused activation) and when linear_act fuses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgtq.fused
from mgtq.fused import apply_activation
import mgtq.models.layers
from mgtq.models.layers import Linear, PatchConv2d, PointwiseConv2d, fuses, linear_act

ONEDNN = pytest.mark.skipif(not (mgtq.fused._X86 and torch._C._has_mkldnn),
                            reason="oneDNN's linear runs on x86 builds with mkldnn only")

BF16_ULP = 2 ** -7  # relative spacing of bf16: the fused epilogue rounds once where the composition rounds twice


def _linear(dtype, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = Linear(64, 96, bias=bias).to(dtype).eval().requires_grad_(False)
    return layer, (torch.randn(2, 33, 64) * 2).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_equals_f_linear_and_fuses_gelu(bias):
    layer, x = _linear(torch.bfloat16, bias=bias)
    ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    torch.testing.assert_close(layer(x).float(), ref, rtol=BF16_ULP, atol=1e-2)
    fused = layer(x, activation="gelu_tanh")
    assert fused.dtype == torch.bfloat16 and fused.shape == (2, 33, 96)
    torch.testing.assert_close(fused.float(), F.gelu(ref, approximate="tanh"), rtol=BF16_ULP, atol=1e-2)


@ONEDNN
def test_bf16_linear_runs_onednn_and_takes_a_strided_input():
    layer, x = _linear(torch.bfloat16)
    strided = torch.cat([x, x], dim=1)[:, 5:38]  # a row slice of a longer sequence, as attention hands it
    with torch.profiler.profile() as prof:
        y = layer(strided)
    names = {e.name for e in prof.events()}
    assert "mkldnn::_linear_pointwise" in names and "aten::addmm" not in names and "aten::bmm" not in names
    torch.testing.assert_close(y, layer(strided.contiguous()), rtol=0, atol=0)


def test_fp32_and_training_keep_f_linear():
    layer, x = _linear(torch.float32)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert torch.equal(layer(x, activation="gelu_tanh"), F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh"))
    bf16, xb = _linear(torch.bfloat16)
    bf16.requires_grad_(True)
    y = bf16(xb, activation="gelu_tanh")  # oneDNN's op has no autograd: this must be the differentiable path
    y.float().sum().backward()
    assert bf16.weight.grad is not None and torch.isfinite(bf16.weight.grad.float()).all()


def test_unknown_activation_is_an_error():
    layer, x = _linear(torch.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        layer(x, activation="relu6")


def test_linear_act_fuses_only_where_nobody_sees_the_difference():
    layer, x = _linear(torch.bfloat16)
    assert fuses(layer, "gelu_tanh")
    seen = []
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        assert not fuses(layer, "gelu_tanh")
        y = linear_act(layer, x, "gelu_tanh")
    finally:
        handle.remove()
    # The hook saw the linear output, not the activated one, and the result is the composition.
    assert torch.equal(seen[0], layer(x))
    assert torch.equal(y, F.gelu(seen[0], approximate="tanh"))

    class Wrapper(nn.Module):  # e.g. an adapter adding its own term after the base layer
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + 1

        def __getattr__(self, name):  # forwards attributes, as some wrappers do
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.base, name)

    wrapped = Wrapper(layer)
    assert not fuses(wrapped, "gelu_tanh")
    assert torch.equal(linear_act(wrapped, x, "gelu_tanh"), apply_activation(layer(x) + 1, "gelu_tanh"))


@ONEDNN
def test_compiled_bf16_linear_calls_onednn_and_equals_eager():
    layer, x = _linear(torch.bfloat16)
    fn = lambda t: linear_act(layer, torch.relu(t) * 2, "gelu_tanh")  # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        graphs = []
        compiled = torch.compile(fn, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm)(x)
        targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        assert any("onednn_linear" in t for t in targets), targets
        torch.testing.assert_close(compiled, fn(x), rtol=0, atol=0)
        torch._dynamo.reset()
        inductor = torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(inductor, fn(x), rtol=0, atol=0)


def test_off_x86_bf16_keeps_f_linear(monkeypatch):
    # oneDNN's x86 kernels only: an aarch64 build (oneDNN through ACL) keeps F.linear.
    monkeypatch.setattr(mgtq.fused, "_X86", False)
    layer, x = _linear(torch.bfloat16)
    with torch.profiler.profile() as prof:
        y = layer(x, activation="gelu_tanh")
    assert "mkldnn::_linear_pointwise" not in {e.name for e in prof.events()}
    assert torch.equal(y, F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh"))


def test_a_subclass_with_its_own_forward_is_called_the_plain_way():
    class Doubled(Linear):  # e.g. an adapter written as a subclass: forward(x) only
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    layer = Doubled(64, 96).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    assert fuses(Linear(4, 4), "gelu_tanh") and not fuses(layer, "gelu_tanh")
    assert torch.equal(linear_act(layer, x, "gelu_tanh"), apply_activation(layer(x), "gelu_tanh"))


# ------------------------------------------------------------------ convolutions as linears
def _conv_pair(kind, cin, cout, bias, dtype, seed=0):
    torch.manual_seed(seed)
    if kind == "pointwise":
        ref, mine = nn.Conv2d(cin, cout, 1, bias=bias), PointwiseConv2d(cin, cout, 1, bias=bias)
    else:
        ref, mine = nn.Conv2d(cin, cout, 2, 2, bias=bias), PatchConv2d(cin, cout, 2, 2, bias=bias)
    ref = ref.to(dtype)
    mine = mine.to(dtype)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("kind", ["pointwise", "patch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_convolutions_as_linears_equal_the_convolution(kind, dtype, bias):
    ref, mine = _conv_pair(kind, 64, 96, bias, dtype)
    x = torch.randn(2, 64, 6, 10, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, expected = mine(x), ref(x)
    assert y.shape == expected.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)  # as the convolution returns for this input
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # one GEMM either way; the summation order may differ
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["pointwise", "patch"])
def test_convolutions_as_linears_fall_back_where_the_layout_or_shape_does_not_fit(kind, monkeypatch):
    ref, mine = _conv_pair(kind, 16, 8, True, torch.float32)
    monkeypatch.setattr(mgtq.models.layers, "float_linear", None)  # a call would fail: only the conv may run
    nchw = torch.randn(1, 16, 4, 6)
    odd = torch.randn(1, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(mine(nchw), ref(nchw))
        if kind == "patch":
            torch.testing.assert_close(mine(odd), ref(odd))
    dilated, dilated_ref = PatchConv2d(16, 8, 2, 2, dilation=2), nn.Conv2d(16, 8, 2, 2, dilation=2)
    dilated.load_state_dict(dilated_ref.state_dict())
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(dilated(x), dilated_ref(x))  # reads pixels 2 apart: not patches


def test_convolutions_as_linears_train():
    ref, mine = _conv_pair("patch", 16, 8, True, torch.float32)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    mine(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad)
