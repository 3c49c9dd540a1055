"""Offloading a quantized model: packed weights and scales leave the module and come back per call."""

import pytest
import torch

from mgtq.models.presets import build_transformer
from mgtq.quantization import W4A8Linear, W4Linear, linear_names, quantize_weights_


def _inputs(model, batch=2, grid=8):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    return dict(
        hidden_states=torch.randint(0, cfg.codebook_size, (batch, grid, grid), generator=g),
        encoder_hidden_states=torch.randn(batch, 5, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
    )


def _quantized():
    torch.manual_seed(0)
    model = build_transformer("test-micro").eval()
    a8 = linear_names(model)[::2]
    quantize_weights_(model, a8_layers=a8, input_scales={n: 0.05 for n in a8})
    return model


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_accelerate_cpu_offload_moves_packed_weights(offload_buffers):
    from accelerate import cpu_offload

    model = _quantized()
    inputs = _inputs(model)
    with torch.no_grad():
        expected = model(**inputs)
        cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=offload_buffers)
        layers = [m for m in model.modules() if isinstance(m, (W4Linear, W4A8Linear))]
        assert layers and all(m.weight_packed.is_meta for m in layers)  # held by the hook, not the module
        assert all(m.weight_scale.is_meta == offload_buffers for m in layers)
        got = model(**inputs)
    assert torch.equal(got, expected)


def test_model_offload_hook_equal_output():
    from accelerate import cpu_offload_with_hook

    model = _quantized()
    inputs = _inputs(model)
    with torch.no_grad():
        expected = model(**inputs)
        model, hook = cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
        got = model(**inputs)
        hook.offload()
    assert torch.equal(got, expected)
    assert all(m.weight_packed.dtype == torch.uint8 and m.weight_scale.dtype == torch.float32
               for m in model.modules() if isinstance(m, (W4Linear, W4A8Linear)))
