"""Fake quantization for quantization-aware training (QAT), convertible exactly to the real modules.

:class:`FakeQuantLinear` *is* torchao's ``FakeQuantizedLinear`` (so torchao's
``enable_linear_fake_quant`` / ``to_linear`` helpers keep working):

* weights: torchao's ``IntxFakeQuantizer`` with ``IntxFakeQuantizeConfig(
  torch.int4, per-channel or group_size, symmetric)`` -- straight-through
  rounding (torchao's ``_Round``), scale ``absmax / 7.5`` recomputed every
  step.  Its numerics equal :func:`~mgtq.quantization.qtensor.quantize_int4_weight`
  bit for bit (both call torchao's ``choose_qparams_affine`` with the same
  arguments), which is what makes fake -> real conversion exact.
* activations: our own :class:`Int8StaticFakeQuantizer`.  Written here because
  torchao 0.18's ``IntxFakeQuantizer`` falls short for SCQ's static int8
  activations: it has no per-tensor granularity (only per-token / per-axis /
  per-group), its ``is_dynamic=False`` mode takes the scale from the first
  batch it sees instead of an offline calibration, and it keeps that scale as
  a plain attribute (lost from the state dict).  Ours holds the calibrated
  scale as a buffer and rounds exactly as the real int8 quantizer does.
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig

from torchao.quantization.quant_primitives import MappingType

from .qtensor import INT8_MAX, INT8_MIN, resolve_group_size, to_int8_domain

__all__ = [
    "FakeQuantLinear",
    "Int8StaticFakeQuantizer",
    "fake_quantize_int8_per_tensor",
    "int4_weight_fake_quant_config",
    "weight_qparams_of",
    "input_scale_of",
]


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - autograd API
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize_int8_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / scale), -128, 127) * scale`` in ``x.dtype`` with a clipped STE.

    Rounds the same fp32 values as the real
    :func:`~mgtq.quantization.qtensor.quantize_int8_per_tensor`, so the integers
    agree exactly.  Gradient: identity inside the int8 range, zero where
    clamped (no gradient to ``scale``: it is calibrated, not learned).
    """
    v = torch.clamp(to_int8_domain(x, scale), INT8_MIN, INT8_MAX)
    q = _RoundSTE.apply(v)
    return (q * scale.to(device=x.device, dtype=torch.float32)).to(x.dtype)


class Int8StaticFakeQuantizer(nn.Module):
    """Static per-tensor symmetric int8 activation fake quantizer.

    Buffer ``scale`` (0-dim fp32): the calibrated int8 step (e.g. absmax / 127).
    ``enabled`` toggles it like torchao's fake quantizers.
    """

    def __init__(self, scale: torch.Tensor | float = 1.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(()).clone())
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quantize_int8_per_tensor(x, self.scale)

    def _apply(self, fn, recurse: bool = True):
        # Keep the scale fp32 through model.to(bf16) (same reason as the real modules).
        old = self.scale
        result = super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale = old.to(device=self.scale.device, dtype=torch.float32)
        return result

    def extra_repr(self) -> str:
        return "meta" if self.scale.is_meta else f"scale={float(self.scale):.4g}, enabled={self.enabled}"


def int4_weight_fake_quant_config(in_features: int, group_size: int | None = None) -> IntxFakeQuantizeConfig:
    """torchao config for symmetric int4 weight fake quant, per channel (``None``) or per group.

    Only ``MappingType.SYMMETRIC``: torchao 0.18's ``IntxFakeQuantizer`` ignores
    other symmetric variants (it calls ``get_group_qparams_symmetric`` with its
    default mapping).
    """
    g = resolve_group_size(in_features, group_size)
    if g == in_features:
        return IntxFakeQuantizeConfig(torch.int4, granularity="per_channel", mapping_type=MappingType.SYMMETRIC)
    return IntxFakeQuantizeConfig(torch.int4, group_size=g, mapping_type=MappingType.SYMMETRIC)


class FakeQuantLinear(FakeQuantizedLinear):
    """``nn.Linear`` with int4 weight fake quant (+ optional static int8 activation fake quant).

    State dict: ``weight``, ``bias``, and ``activation_fake_quantizer.scale``
    when activations are fake-quantized.

    Args:
        group_size: ``None`` = per output channel (required for W4A8).
        input_scale: calibrated int8 activation step; ``None`` = A16 (weights only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        input_scale: torch.Tensor | float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            activation_config=None,
            weight_config=int4_weight_fake_quant_config(in_features, group_size),
            device=device,
            dtype=dtype,
        )
        self.group_size = resolve_group_size(in_features, group_size)
        self.activation_fake_quantizer = (
            None if input_scale is None else Int8StaticFakeQuantizer(input_scale, device=device)
        )

    @classmethod
    def from_linear(
        cls,
        mod: nn.Linear,
        group_size: int | None = None,
        input_scale: torch.Tensor | float | None = None,
    ) -> "FakeQuantLinear":
        """Wrap ``mod``; the new layer *shares* its weight/bias Parameters (optimizer state stays valid)."""
        # built on meta: nn.Linear's own initialisation would draw from the caller's global RNG for weights
        # that are replaced at once
        new = cls(mod.in_features, mod.out_features, mod.bias is not None, group_size=group_size, device="meta",
                  dtype=mod.weight.dtype)
        new.weight = mod.weight
        new.bias = mod.bias
        if input_scale is not None:
            new.set_input_scale(input_scale)
        return new

    def set_input_scale(self, scale: torch.Tensor | float) -> None:
        """Turn on (or re-calibrate) int8 activation fake quant."""
        if self.activation_fake_quantizer is None:
            self.activation_fake_quantizer = Int8StaticFakeQuantizer(scale, device=self.weight.device)
        else:
            self.activation_fake_quantizer.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def weight_qparams_of(fq: nn.Module) -> tuple[int | None, str]:
    """``(group_size or None for per-channel, mapping_type)`` of a fake-quant linear."""
    if not isinstance(fq, FakeQuantLinear):
        raise TypeError(f"expected a FakeQuantLinear, got {type(fq).__name__}")
    g = None if fq.group_size == fq.in_features else fq.group_size
    return g, "SYMMETRIC"


def input_scale_of(fq: nn.Module) -> torch.Tensor | None:
    """The static int8 activation scale of a fake-quant linear, or ``None`` for A16."""
    quantizer = getattr(fq, "activation_fake_quantizer", None)
    return None if quantizer is None else quantizer.scale.detach()
