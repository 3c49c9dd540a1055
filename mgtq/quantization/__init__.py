"""Quantized tensor formats, modules and passes of mgtq.

Layout (one concept per module):

* :mod:`.packing`    -- two int4 values per byte, fast unpack;
* :mod:`.qtensor`    -- what a quantized weight / activation is, and the kernels on it;
* :mod:`.qlinear`    -- ``W4Linear`` (W4A16) and ``W4A8Linear`` (real int8 GEMM);
* :mod:`.fake_quant` -- ``FakeQuantLinear`` for QAT (torchao-based), exact conversion to the above;
* :mod:`.api`        -- passes over a model: ``quantize_(model, config)``, prepare/convert QAT, calibrate, count bytes;
* :mod:`.checkpoint` -- the quantized checkpoint format: manifest, save, strict load (import it by name).

Importing this package does not import torchao (seconds of start-up): the
fake-quant names are loaded on first access, and torchao's quant primitives
when weights are actually quantized.  Running a quantized checkpoint needs
neither.
"""

from importlib import import_module

from .api import (
    SCQConfig,
    W4A8Config,
    W4A16Config,
    ActivationStats,
    calibrate_activations,
    convert_qat_,
    input_scales_from_stats,
    linear_names,
    model_weight_nbytes,
    prepare_qat_,
    quantize_,
    quantize_weights_,
    replace_linears_,
)
from .packing import pack_int4, unpack_int4, unpack_int4_times16
from .qlinear import QuantizedLinear, W4A8Linear, W4Linear
from .qtensor import (
    choose_int8_scale,
    dequantize_int4_weight,
    int8_int4_linear,
    int8_mm,
    quantize_int4_weight,
    quantize_int8_per_tensor,
)

__all__ = [
    "SCQConfig",
    "W4A8Config",
    "W4A16Config",
    "quantize_",
    "replace_linears_",
    "ActivationStats",
    "FakeQuantLinear",
    "Int8StaticFakeQuantizer",
    "QuantizedLinear",
    "W4A8Linear",
    "W4Linear",
    "calibrate_activations",
    "choose_int8_scale",
    "convert_qat_",
    "dequantize_int4_weight",
    "fake_quantize_int8_per_tensor",
    "input_scales_from_stats",
    "int8_int4_linear",
    "int8_mm",
    "linear_names",
    "model_weight_nbytes",
    "pack_int4",
    "prepare_qat_",
    "quantize_int4_weight",
    "quantize_int8_per_tensor",
    "quantize_weights_",
    "unpack_int4",
    "unpack_int4_times16",
]

# PEP 562 lazy attributes: the QAT module subclasses torchao's FakeQuantizedLinear.
_LAZY = {
    "FakeQuantLinear": ".fake_quant",
    "Int8StaticFakeQuantizer": ".fake_quant",
    "fake_quantize_int8_per_tensor": ".fake_quant",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
