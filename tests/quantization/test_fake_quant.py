"""FakeQuantLinear (QAT): STE gradients, passes, calibration, exact conversion to the real modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.qat.linear import disable_linear_fake_quant

from mgtq.quantization import (
    ActivationStats,
    FakeQuantLinear,
    W4A8Linear,
    W4Linear,
    calibrate_activations,
    choose_int8_scale,
    convert_qat_,
    fake_quantize_int8_per_tensor,
    input_scales_from_stats,
    model_weight_nbytes,
    prepare_qat_,
    quantize_int8_per_tensor,
    quantize_weights_,
)

K, N = 64, 32


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(K, 2 * K)
        self.block = nn.Sequential(nn.Linear(2 * K, K), nn.GELU(), nn.Linear(K, N, bias=False))
        self.proj_out = nn.Linear(N, N)

    def forward(self, x):
        return self.proj_out(self.block(self.proj_in(x)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny()


def test_ste_gradients_reach_float_weight_and_input():
    torch.manual_seed(0)
    fq = FakeQuantLinear(K, N, group_size=32, input_scale=0.05)
    x = torch.randn(8, K, requires_grad=True)
    fq(x).square().sum().backward()
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_activation_ste_is_clipped_identity():
    scale = torch.tensor(0.1)
    x = torch.tensor([0.04, 1.0, 20.0, -30.0], requires_grad=True)
    y = fake_quantize_int8_per_tensor(x, scale)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 1.0, 12.7, -12.8]))
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_fake_and_real_int8_round_the_same_values():
    x = torch.randn(1000) * 3
    scale = choose_int8_scale(x.abs().max() * 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        q = quantize_int8_per_tensor(xd, scale)
        assert torch.equal(fake_quantize_int8_per_tensor(xd, scale), (q.float() * scale).to(dtype))


@pytest.mark.parametrize("group_size", [None, 16])
def test_fake_to_w4_exact(group_size):
    torch.manual_seed(1)
    fq = FakeQuantLinear(K, N, group_size=group_size)
    real = W4Linear.from_fake_quant(fq)
    assert real.group_size == (group_size or K)
    x = torch.randn(3, 5, K)
    with torch.no_grad():
        torch.testing.assert_close(real(x), fq(x), rtol=1e-6, atol=1e-6)
        assert torch.equal(real.dequantize_weight(), fq.weight_fake_quantizer(fq.weight))


def test_fake_to_w4a8_agrees_to_integer_arithmetic():
    torch.manual_seed(2)
    fq = FakeQuantLinear(K, N, input_scale=0.03)
    real = W4A8Linear.from_fake_quant(fq)
    assert torch.equal(real.input_scale, fq.activation_fake_quantizer.scale)
    x = torch.randn(40, K)
    with torch.no_grad():
        # only fp accumulation order differs: int32 GEMM vs fp32 GEMM of the same products
        torch.testing.assert_close(real(x), fq(x), rtol=1e-5, atol=1e-5)
        y_bf = real(x.bfloat16())
        torch.testing.assert_close(y_bf.float(), fq(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_fake_quant_toggle_and_state_dict():
    fq = FakeQuantLinear(K, N, input_scale=0.03)
    assert set(fq.state_dict()) == {"weight", "bias", "activation_fake_quantizer.scale"}
    disable_linear_fake_quant(fq)
    x = torch.randn(2, K)
    torch.testing.assert_close(fq(x), F.linear(x, fq.weight, fq.bias))
    with pytest.raises(ValueError, match="per-channel"):
        W4A8Linear.from_fake_quant(FakeQuantLinear(K, N, group_size=16, input_scale=0.1))
    with pytest.raises(ValueError, match="no int8 activation"):
        W4A8Linear.from_fake_quant(FakeQuantLinear(K, N))


def test_prepare_then_convert_passes(model):
    x = torch.randn(6, K)
    a8 = {"block.0"}
    with calibrate_activations(model, ["block.0"]) as stats:
        model(x)
    scales = input_scales_from_stats(stats)
    weight_before = model.proj_in.weight
    rng = torch.get_rng_state()
    prepared = prepare_qat_(model, group_size=16, skip=["proj_out"], a8_layers=a8, input_scales=scales)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random numbers stay the caller's
    assert model.block[0].activation_fake_quantizer.scale.device == weight_before.device
    assert prepared == ["proj_in", "block.0", "block.2"]
    assert model.proj_in.weight is weight_before  # parameters shared with the float model
    assert isinstance(model.proj_out, nn.Linear) and not isinstance(model.proj_out, FakeQuantLinear)
    with torch.no_grad():
        y_fake = model(x)
    kinds = convert_qat_(model)
    assert kinds == {"proj_in": "W4Linear", "block.0": "W4A8Linear", "block.2": "W4Linear"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_fake, rtol=1e-5, atol=1e-5)


def test_quantize_weights_pass_and_nbytes(model):
    fp32_bytes = model_weight_nbytes(model)
    x = torch.randn(4, K)
    with calibrate_activations(model) as stats:
        model(x)
    assert set(stats) == {"proj_in", "block.0", "block.2", "proj_out"}
    done = quantize_weights_(
        model, group_size=32, skip=["proj_*"], a8_layers={"block.2"}, input_scales=input_scales_from_stats(stats)
    )
    assert done == {"block.0": "W4Linear", "block.2": "W4A8Linear"}
    assert model.block[0].group_size == 32 and model.block[2].group_size == K
    assert model_weight_nbytes(model) < fp32_bytes
    assert model_weight_nbytes(model, linear_only=False) > model_weight_nbytes(model)
    assert model(x).shape == (4, N)
    with pytest.raises(KeyError, match="input_scales"):
        quantize_weights_(Tiny(), a8_layers={"proj_in"})
    with pytest.raises(KeyError, match="not nn.Linear"):
        quantize_weights_(Tiny(), a8_layers={"nope"}, input_scales={})


def test_activation_stats_percentile_and_growth():
    st = ActivationStats(bins=1000)
    st.update(torch.linspace(-1, 1, 10001))
    st.update(torch.tensor([8.0]))  # outlier: range doubles three times
    assert st.absmax == 8.0 and st.count == 10002 and st.batches == 2
    assert abs(st.mean_abs - (5000.5 / 10001 * 10001 / 10002 + 8 / 10002)) < 1e-2
    assert 0.45 < st.percentile(50) < 0.56
    assert st.percentile(99.9) < 1.02
    torch.testing.assert_close(st.int8_scale("absmax"), torch.tensor(8.0 / 127))
    assert st.int8_scale("percentile", 99.9) < 1.02 / 127 + 1e-6
    with pytest.raises(ValueError):
        st.int8_scale("mse")


def test_calibration_hooks_removed_on_exit(model):
    with calibrate_activations(model, ["proj_in"]):
        pass
    assert not model.proj_in._forward_pre_hooks
    with pytest.raises(KeyError):
        with calibrate_activations(model, ["missing"]):
            pass


def test_passes_validate_before_replacing(model):
    with pytest.raises(ValueError, match="skip"):
        prepare_qat_(model, skip=["proj_*"], a8_layers={"proj_in"}, input_scales={"proj_in": 0.1})
    with pytest.raises(KeyError, match="input_scales"):
        quantize_weights_(model, a8_layers={"block.0"}, input_scales={})
    assert type(model.proj_in) is nn.Linear and type(model.block[0]) is nn.Linear  # untouched


def test_load_quantized_into_meta_model(model, tmp_path):
    from safetensors.torch import load_file, save_file

    from mgtq.quantization.checkpoint import install_quantized_, quantized_layers

    x = torch.randn(3, K)
    quantize_weights_(model, group_size=16, skip=["proj_out"], a8_layers={"block.2"}, input_scales={"block.2": 0.05})
    save_file(model.state_dict(), tmp_path / "q.safetensors")
    with torch.device("meta"):
        fresh = Tiny()
    layers = quantized_layers(model)
    assert {n: s.scheme for n, s in layers.items()} == {"proj_in": "w4a16", "block.0": "w4a16", "block.2": "w4a8"}
    install_quantized_(fresh, layers)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"), assign=True)
    assert fresh.proj_in.group_size == 16 and not any(t.is_meta for t in fresh.state_dict().values())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
