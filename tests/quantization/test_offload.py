"""Offloading a quantized model: packed weights and scales leave the module and come back per call."""

import pytest
import torch

from mgtq.quantization import W4A8Linear, W4Linear
from testkit import micro_forward_inputs, quantized_micro_transformer


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_accelerate_cpu_offload_moves_packed_weights(offload_buffers):
    from accelerate import cpu_offload

    model = quantized_micro_transformer()
    inputs = micro_forward_inputs(model)
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

    model = quantized_micro_transformer()
    inputs = micro_forward_inputs(model)
    with torch.no_grad():
        expected = model(**inputs)
        model, hook = cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
        got = model(**inputs)
        hook.offload()
    assert torch.equal(got, expected)
    assert all(m.weight_packed.dtype == torch.uint8 and m.weight_scale.dtype == torch.float32
               for m in model.modules() if isinstance(m, (W4Linear, W4A8Linear)))
