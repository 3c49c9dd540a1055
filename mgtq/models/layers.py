"""The transformer's float Linear, and the activation a linear layer may fuse into its GEMM epilogue.

On a CPU with oneDNN, a bf16 ``F.linear`` becomes ``addmm``, which first copies the broadcast bias
into the output and then accumulates onto it, and the MLP's tanh-GELU then runs as a separate eager
pass over the (tokens x 4·D) activation — at Meissonic-1024 sizes the slowest elementwise op of a
block. oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op Inductor itself emits for
linear + pointwise patterns) adds the bias and applies GELU to the fp32 accumulator before the one
bf16 rounding: fewer passes, and no extra rounding between the GEMM and the GELU.

:class:`Linear` is an ``nn.Linear`` (same parameters, same state-dict keys; quantization swaps it
like any ``nn.Linear``) whose forward takes an optional ``activation``. A caller asks for a fused
activation only through :func:`linear_act`, which falls back to ``activation(layer(x))`` wherever
fusing could change what someone observes: a layer class that does not declare the activation in
``fused_activations`` (a LoRA or other wrapper, a fake-quant training layer), or a layer with
forward hooks (they must see the pre-activation output).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

# Activation name -> (oneDNN post-op name, algorithm). "gelu_tanh" is F.gelu(approximate="tanh").
ACTIVATIONS = {"gelu_tanh": ("gelu", "tanh")}


def check_activation(activation: str | None) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)} or None")


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The unfused activation: what a fused epilogue computes (up to its single rounding)."""
    check_activation(activation)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


def onednn_post_op(activation: str | None) -> tuple[str, str]:
    """(post-op name, algorithm) of oneDNN's linear ops for ``activation`` (None: no post-op)."""
    check_activation(activation)
    return ACTIVATIONS[activation] if activation is not None else ("none", "")


# oneDNN's x86 kernels: elsewhere (aarch64 builds run oneDNN through ACL) F.linear stays the default.
_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _onednn_float_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's linear runs this bf16 GEMM (x86 CPU inference only: the op has no autograd).

    fp32 stays on F.linear: MKL's sgemm was as fast or faster at every Meissonic size measured
    (benchmarks/results/float_linear_kernels.md).
    """
    return (
        _X86
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and torch._C._has_mkldnn  # a constant, readable under torch.compile
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


@torch.library.custom_op("mgtq::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "") -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` by oneDNN, as one op Inductor calls as it is: its own lowering
    of ``mkldnn._linear_pointwise`` expects a weight prepacked at freezing (a second copy of every
    weight), not a parameter or a weight dequantized in the graph."""
    post, algorithm = onednn_post_op(activation or None)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], algorithm)


@onednn_linear.register_fake
def _(x, weight, bias, activation=""):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None = None) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))``, in one oneDNN call where :func:`_onednn_float_linear` says so."""
    if _onednn_float_linear(x, weight) and (bias is None or bias.dtype == x.dtype):
        if torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias, activation or "")
        post, algorithm = onednn_post_op(activation)  # eager: the op itself, without custom-op dispatch
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], algorithm)
    return apply_activation(F.linear(x, weight, bias), activation)


class Linear(nn.Linear):
    """``nn.Linear`` with an optional fused activation: ``forward(x, activation=None)``."""

    fused_activations = tuple(ACTIVATIONS)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        return float_linear(x, self.weight, self.bias, activation)


def fuses(layer: nn.Module, activation: str) -> bool:
    """Whether ``layer(x, activation=...)`` may be called: its class declares the activation (looked
    up on the type, so a wrapper forwarding attributes does not claim it) and no forward hook would
    see the activated output in place of the linear one."""
    return (
        activation in getattr(type(layer), "fused_activations", ())
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
