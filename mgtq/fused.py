"""Float-path fusions: the activation a linear layer may fuse into its GEMM epilogue and the float linear
that fuses it; attention; the QK-norm + RoPE.

On a CPU with oneDNN, a bf16 ``F.linear`` becomes ``addmm``, which first copies the broadcast bias
into the output and then accumulates onto it, and the MLP's tanh-GELU then runs as a separate eager
pass over the (tokens x 4·D) activation — at Meissonic-1024 sizes the slowest elementwise op of a
block. oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op Inductor itself emits for
linear + pointwise patterns) adds the bias and applies GELU to the fp32 accumulator before the one
bf16 rounding: fewer passes, and no extra rounding between the GEMM and the GELU.

Depends on torch and mgtq.native only: the float layers (mgtq.models.layers) and the quantized ones
(mgtq.quantization) both build on it. A layer whose ``forward(x, activation=None)`` applies these
names marks that forward with :func:`fuses_activations`; ``mgtq.models.layers.linear_act`` calls
it with an activation only then.

Attention: :func:`attention` is ``F.scaled_dot_product_attention`` with an optional bias per key; on
CPUs with AMX it runs mgtq's own kernel (:func:`mgtq.native.amx.attention`; against torch's CPU flash
attention in ``benchmarks/results/attention_kernels_1thread.md``), on CPUs without AMX but with AVX512-BF16
(``avx512-vnni`` class, e.g. AMD Zen 4) its AVX512-BF16 version
(``benchmarks/results/attention_kernels_avx512-vnni_1thread.md``). :func:`qk_norm_rope` is attention's
RMS QK-norm followed by RoPE, one pass per row there, and :func:`rms_norm_cpu` the RMSNorm of the
token grids around the transformer (:class:`mgtq.models.layers.RMSNorm`).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from mgtq.native import amx
from mgtq.native.cpu import cpu_class, is_x86

# Activation name -> (oneDNN post-op name, algorithm). "gelu_tanh" is F.gelu(approximate="tanh").
ACTIVATIONS = {"gelu_tanh": ("gelu", "tanh")}

# oneDNN's x86 kernels: elsewhere (aarch64 builds run oneDNN through ACL) F.linear stays the default.
_X86 = is_x86()


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


def fuses_activations(forward):
    """Mark a layer's ``forward(x, activation=None)`` as applying every name in :data:`ACTIVATIONS`.

    The mark is on the function, not the class: a subclass that overrides ``forward`` without it is
    called the plain way.
    """
    forward.fused_activations = tuple(ACTIVATIONS)
    return forward


def _plain(t: torch.Tensor | None) -> bool:
    # Tensor subclasses (torchao's quantized weights, DTensor) dispatch ops themselves; oneDNN's op is
    # not among those they implement.
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def _onednn_float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN's linear runs this bf16 GEMM (x86 CPU inference only: the op has no autograd).

    fp32 stays on F.linear: MKL's sgemm was faster at every Meissonic size measured
    (benchmarks/results/float_linear_kernels.md).
    """
    return (
        _X86
        and torch._C._has_mkldnn  # a constant, readable under torch.compile
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and (bias is None or bias.dtype == torch.bfloat16)
        and _plain(x) and _plain(weight) and _plain(bias)
        and not (torch.is_grad_enabled()
                 and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))
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
    if _onednn_float_linear(x, weight, bias):
        if torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias, activation or "")
        post, algorithm = onednn_post_op(activation)  # eager: the op itself, without custom-op dispatch
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], algorithm)
    return apply_activation(F.linear(x, weight, bias), activation)


def _native_inference(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a call on `x` and `others` is one mgtq's CPU kernels may take on an x86 CPU: a CPU tensor `x`, plain
    tensors (subclasses dispatch ops themselves), and no autograd (the kernels have no backward)."""
    tensors = [t for t in (x, *others) if t is not None]
    return (_X86 and x.device.type == "cpu" and all(_plain(t) for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _bf16_inference(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether mgtq's AVX512-BF16 kernels (the one-pass norms; no AMX tiles) may take a call: :func:`_native_inference`
    on a CPU with AVX512-BF16 and the kernels built, whose class is not forced to ``avx2`` or ``generic`` (which turn
    off every mgtq kernel)."""
    return _native_inference(x, *others) and cpu_class() not in ("avx2", "generic") and amx.avx512_bf16_available()


def _amx_inference(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether mgtq's AMX kernels may take a call on `x` and `others`: :func:`_native_inference` on an AMX-int8
    class CPU (``MGTQ_CPU_CLASS`` set to another class turns them off) with the kernels built. What shapes and
    dtypes a kernel takes is its own ``amx.supports_*``."""
    return _native_inference(x, *others) and cpu_class() == "amx-int8" and amx.available()


def _amx_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None) -> bool:
    """Whether mgtq's AMX attention runs this call (bf16 CPU inference on an AMX-int8 class CPU: no autograd)."""
    return _amx_inference(q, k, v, key_bias) and amx.supports_attention(q, k, v, key_bias)


def _avx512_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None) -> bool:
    """Whether mgtq's attention runs this call without AMX tiles: bf16 CPU inference on a CPU of another class
    than ``amx-int8`` and ``avx2`` whose AVX512-BF16 the kernel needs (AMD Zen 4, Intel Cooper Lake)."""
    return (_native_inference(q, k, v, key_bias) and cpu_class() in ("amx-bf16", "avx512-vnni")
            and amx.avx512_bf16_available() and amx.supports_attention(q, k, v, key_bias))


@torch.library.custom_op("mgtq::attention_cpu", mutates_args=())
def attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None,
                  tiles: bool = True) -> torch.Tensor:
    """:func:`mgtq.native.amx.attention` as one op (Inductor calls it as it is, as it calls SDPA's kernel);
    ``tiles=False``: its AVX512-BF16 version."""
    return amx.attention(q, k, v, key_bias, tiles)


@attention_cpu.register_fake
def _(q, k, v, key_bias, tiles=True):
    b, h, sq, d = q.shape
    return q.new_empty((b, sq, h, d)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)`` for ``(B, H, S, D)`` tensors; ``key_bias``:
    None or ``(B, 1, 1, Sk)``, added to every query's logits of that key (cast to q's dtype).

    Where :func:`_amx_attention` says so, mgtq's AMX kernel (where :func:`_avx512_attention` does, its AVX512-BF16
    version): the same attention within bf16 rounding, returned as a view of a ``(B, Sq, H, D)`` tensor
    (``.transpose(1, 2)`` of it is contiguous).
    """
    if _amx_attention(q, k, v, key_bias):
        return attention_cpu(q, k, v, key_bias)  # an op in eager too: profilers and dispatch modes see it
    if _avx512_attention(q, k, v, key_bias):
        return attention_cpu(q, k, v, key_bias, False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_bias is None else key_bias.to(q.dtype))


def native_qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :func:`qk_norm_rope` runs mgtq's one-pass kernel here (bf16 inference on a CPU with AVX512-BF16)."""
    return _bf16_inference(x, weight) and amx.supports_qknorm_rope(x, weight, cos, sin)


@torch.library.custom_op("mgtq::qknorm_rope_cpu", mutates_args=())
def qk_norm_rope_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """:func:`mgtq.native.amx.qknorm_rope` as one op: under compile it sits between two opaque ops (the
    projection's GEMM and attention), so there is nothing for Inductor to fuse it with."""
    return amx.qknorm_rope(x, weight, eps, cos, sin)


@qk_norm_rope_cpu.register_fake
def _(x, weight, eps, cos, sin):
    return torch.empty_like(x)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope(rms_norm(x) * weight, cos, sin)`` for inference: x ``(B, H, N, D)``, tables ``(N, D)`` or
    ``(B, N, D)`` (rope_tables' interleaved pairs).

    On a CPU with AVX512-BF16 in bf16, mgtq's one-pass kernel (:func:`mgtq.native.amx.qknorm_rope`); elsewhere a
    chain of in-place fp32 passes over one buffer (upcast, mean square, scale by the row's rsqrt and by the
    weight, one complex product per pair, cast back). Both round once, after the rotation.
    """
    if native_qk_norm_rope(x, weight, cos, sin):
        return qk_norm_rope_cpu(x, weight, eps, cos, sin)  # an op in eager too, as attention_cpu
    if cos.dim() == 3:  # per-sample tables (B, N, D) broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    y = x.to(torch.float32, copy=True)  # the one fp32 buffer every pass below writes in place
    y.mul_(y.square().mean(-1, keepdim=True).add_(eps).rsqrt_())
    y.mul_(weight.to(torch.float32))
    torch.view_as_complex(y.unflatten(-1, (-1, 2))).mul_(torch.complex(cos[..., ::2].float(), sin[..., ::2].float()))
    return y.to(x.dtype)


def native_rms_norm(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether :func:`rms_norm` runs mgtq's one-pass kernel here (bf16 inference on a CPU with AVX512-BF16)."""
    return weight is not None and _bf16_inference(x, weight) and amx.supports_rms_norm(x, weight)


@torch.library.custom_op("mgtq::rms_norm_cpu", mutates_args=())
def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`mgtq.native.amx.rms_norm` as one op (profilers and dispatch modes see it, as attention_cpu)."""
    return amx.rms_norm(x, weight, eps)


@rms_norm_cpu.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)
