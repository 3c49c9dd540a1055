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

from mgtq.fused import apply_activation, float_linear, fuses_activations


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
