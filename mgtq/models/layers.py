"""The transformer's float Linear, and the one call through which an MLP fuses its activation.

:class:`Linear` is an ``nn.Linear`` (same parameters, same state-dict keys; quantization swaps it
like any ``nn.Linear``) whose forward takes an optional ``activation`` and runs
:func:`mgtq.fused.float_linear` (oneDNN's linear for bf16 on x86 CPUs, the activation in its
epilogue). A caller asks for a fused activation only through :func:`linear_act`, which falls back
to ``activation(layer(x))`` wherever fusing could change what someone observes: a layer whose
forward is not marked by :func:`mgtq.fused.fuses_activations` (a LoRA or other wrapper, a subclass
with its own forward, a fake-quant training layer), or a layer with forward hooks (they must see the
pre-activation output).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

from mgtq.fused import apply_activation, float_linear, fuses_activations, native_rms_norm, rms_norm_cpu


class Linear(nn.Linear):
    """``nn.Linear`` with an optional fused activation: ``forward(x, activation=None)``."""

    @fuses_activations
    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        return float_linear(x, self.weight, self.bias, activation)


def fuses(layer: nn.Module, activation: str) -> bool:
    """Whether ``layer(x, activation=...)`` may be called: the forward its class runs is marked for the
    activation (looked up on the type, so a wrapper forwarding attributes does not claim it) and no
    forward hook would see the activated output in place of the linear one."""
    return (
        activation in getattr(type(layer).forward, "fused_activations", ())
        and not layer._forward_hooks
        and not nn.modules.module._global_forward_hooks
    )


def linear_act(layer: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation(layer(x))``, fused into the layer's GEMM epilogue when :func:`fuses` allows it.

    The call still goes through ``layer(...)``, so offload hooks (accelerate) run as for any call.
    """
    if fuses(layer, activation):
        return layer(x, activation=activation)
    return apply_activation(layer(x), activation)


class RMSNorm(DiffusersRMSNorm):
    """diffusers' RMSNorm (same `weight` key and values) that runs as one pass per row where
    :func:`mgtq.fused.native_rms_norm` says so: diffusers' chain makes five passes over the tensor, two of
    them fp32 copies (Meissonic-1024 normalises 64×64 token grids with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and native_rms_norm(x, self.weight):
            return rms_norm_cpu(x, self.weight, self.eps)
        return super().forward(x)


def _channels_last_rows(x: torch.Tensor) -> torch.Tensor | None:
    """(B, H, W, C) view of an NCHW tensor stored channels last (each pixel's channels one dense row), else None."""
    rows = x.permute(0, 2, 3, 1) if x.dim() == 4 else None
    return rows if rows is not None and rows.is_contiguous() else None


class PointwiseConv2d(nn.Conv2d):
    """A 1×1 ``nn.Conv2d`` (same parameters and keys) that runs as a linear over each pixel's channels when its
    input is stored channels last: oneDNN runs the same GEMM faster as a linear than as a convolution
    (Meissonic's 1024 → 8192 logits head). Output channels last, as the convolution's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _channels_last_rows(x) if self.kernel_size == (1, 1) and self.groups == 1 else None
        if rows is None or self.stride != (1, 1) or self.padding not in ((0, 0), "valid"):
            return super().forward(x)
        return float_linear(rows, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class PatchConv2d(nn.Conv2d):
    """A k×k convolution with stride k and no overlap (feature compression's 2×2 down) as one linear over
    k×k patches of a channels-last input. diffusers' Downsample2D pads one row and column that such a
    convolution never reads on even sizes; here they are not made. Odd sizes and other layouts: the
    convolution itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        rows = _channels_last_rows(x)
        if (rows is None or self.kernel_size != (k, k) or self.stride != (k, k) or self.groups != 1
                or self.dilation != (1, 1) or self.padding not in ((0, 0), "valid") or x.shape[2] % k or x.shape[3] % k):
            return super().forward(x)
        b, h, w, c = rows.shape
        patches = rows.reshape(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // k, w // k, -1)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)  # (O, k·k·C) as the patches
        return float_linear(patches, weight, self.bias).permute(0, 3, 1, 2)

