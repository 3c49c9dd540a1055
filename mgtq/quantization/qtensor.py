"""What a quantized tensor is in mgtq, and the math on it.

* Weights: symmetric int4, one fp32 scale per output channel or per group of
  ``group_size`` consecutive input features, packed two per byte (see
  :mod:`mgtq.quantization.packing`).  ``w ~= q * scale``, ``q in [-8, 7]``.
* Activations: symmetric int8 with one static (calibrated) fp32 scale per
  tensor.  ``x ~= q * scale``, ``q = clamp(round(x * (1 / scale)), -128, 127)``.

The choice of the weight scale (torchao ``MappingType.SYMMETRIC``: ``scale =
absmax / 7.5``, the full [-8, 7] range) and the rounding (``round(w * (1 /
scale))``) come from torchao's quant primitives so that torchao's QAT fake
quantizer and the real kernels here agree bit for bit.

Kernels (all device-agnostic torch ops; dispatch points for CUDA kernels are
marked ``DISPATCH POINT``):

* :func:`dequantize_int4_weight` -- packed int4 -> float weight, chunked over
  output rows so the int8 intermediate stays in cache;
* :func:`quantize_int8_per_tensor` -- float activation -> int8;
* :func:`int8_int4_linear` -- int8 activations x packed int4 weights through a
  real int8 x int8 -> int32 GEMM (``torch._int_mm``), chunked over output
  columns so the int32 accumulator and the rescale epilogue stay in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    quantize_affine,
)

from .packing import INT4_MAX, INT4_MIN, pack_int4, unpack_int4, unpack_int4_x16

__all__ = [
    "INT8_MIN",
    "INT8_MAX",
    "MappingType",
    "PackedInt4Weight",
    "quantize_int4_weight",
    "dequantize_int4_weight",
    "choose_int8_scale",
    "quantize_int8_per_tensor",
    "to_int8_domain",
    "int8_mm",
    "int8_int4_linear",
]

INT8_MIN = -128
INT8_MAX = 127

# Rows of weight dequantized per step: 256 x 5120 int8 (1.3 MB) + the bf16 rows
# written stay within a 2 MB L2.  Tuned on Meissonic shapes (benchmarks/).
DEQUANT_CHUNK_ROWS = 256
# Output columns per int8 GEMM step: a (2202 x 256) int32 accumulator is 2.2 MB,
# so the epilogue (int32 -> float, rescale, bias, cast) runs from cache instead
# of streaming a 36 MB accumulator through memory.  Tuned in benchmarks/.
INT8_MM_CHUNK_N = 256

_SUPPORTED_MAPPINGS = (MappingType.SYMMETRIC, MappingType.SYMMETRIC_NO_CLIPPING_ERR)


# --------------------------------------------------------------------------- weights


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """``None`` or ``in_features`` mean per output channel; otherwise it must divide K."""
    if group_size is None or group_size == in_features:
        return in_features
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
    return group_size


def quantize_int4_weight(
    weight: torch.Tensor,
    group_size: int | None = None,
    mapping_type: MappingType = MappingType.SYMMETRIC,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 quantization of a linear weight with torchao's primitives.

    Args:
        weight: float tensor ``(N, K)`` (out_features, in_features).
        group_size: K-elements sharing one scale; ``None`` = per output channel.
        mapping_type: ``MappingType.SYMMETRIC`` (``absmax / 7.5``, same as
            torchao's int4 QAT fake quantizer) or ``SYMMETRIC_NO_CLIPPING_ERR``.

    Returns:
        ``(q, scale)``: int8 ``(N, K)`` with values in [-8, 7] and fp32 scales
        ``(N, K // group_size)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight, got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating point weight, got {weight.dtype}")
    if mapping_type not in _SUPPORTED_MAPPINGS:
        raise ValueError(f"only symmetric mappings are supported, got {mapping_type}")
    n, k = weight.shape
    g = resolve_group_size(k, group_size)
    block = (1, g)
    # Scales are kept in fp32 whatever the weight dtype: exact agreement with the
    # fake quantizer, and their cost is small (4 bytes per group).
    scale, zero_point = choose_qparams_affine(
        weight, mapping_type, block, torch.int8, INT4_MIN, INT4_MAX, scale_dtype=torch.float32
    )
    q = quantize_affine(weight, block, scale, zero_point, torch.int8, INT4_MIN, INT4_MAX)
    return q, scale.reshape(n, k // g)


def _check_weight_pair(packed: torch.Tensor, scale: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed weight must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if scale.dim() != 2 or scale.shape[0] != packed.shape[0]:
        raise ValueError(f"scale must be (N, groups) with N={packed.shape[0]}, got {tuple(scale.shape)}")
    k = packed.shape[1] * 2
    if k % scale.shape[1] != 0:
        raise ValueError(f"{scale.shape[1]} groups do not divide in_features {k}")


def dequantize_int4_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    chunk_rows: int = DEQUANT_CHUNK_ROWS,
) -> torch.Tensor:
    """Packed int4 ``(N, K/2)`` + scales ``(N, G)`` -> float weight ``(N, K)`` in ``dtype``.

    Equals ``(q.float() * scale).to(dtype)`` exactly: the kernel multiplies
    ``16 * q`` by ``scale / 16`` (a power-of-two rescale, exact) in fp32 and
    rounds once to ``dtype``.
    """
    _check_weight_pair(packed, scale)
    n, half = packed.shape
    k = 2 * half
    groups = scale.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if packed.device.type == "meta":
        return out
    scale16 = scale.to(torch.float32) * (1.0 / 16.0)  # (N, G)
    rows = max(1, min(chunk_rows, n))
    buf = torch.empty(rows, k, dtype=torch.int8, device=packed.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w16 = unpack_int4_x16(packed[r0:r1], out=buf[: r1 - r0])
        dst = out[r0:r1]
        if groups == 1:
            torch.mul(w16, scale16[r0:r1], out=dst)
        else:
            torch.mul(
                w16.view(r1 - r0, groups, k // groups),
                scale16[r0:r1, :, None],
                out=dst.view(r1 - r0, groups, k // groups),
            )
    return out


@dataclass(frozen=True)
class PackedInt4Weight:
    """A linear weight stored as packed int4 + fp32 scales.

    Attributes:
        packed: uint8 ``(N, K // 2)``, split-halves layout (:mod:`.packing`).
        scale: fp32 ``(N, K // group_size)``.
    """

    packed: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        _check_weight_pair(self.packed, self.scale)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        group_size: int | None = None,
        mapping_type: MappingType = MappingType.SYMMETRIC,
    ) -> "PackedInt4Weight":
        q, scale = quantize_int4_weight(weight, group_size, mapping_type)
        return cls(pack_int4(q), scale)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    def int_values(self) -> torch.Tensor:
        """int8 ``(N, K)`` in [-8, 7]."""
        return unpack_int4(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4_weight(self.packed, self.scale, dtype)

    def nbytes(self) -> int:
        return tensor_nbytes(self.packed) + tensor_nbytes(self.scale)


def tensor_nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ----------------------------------------------------------------------- activations


def choose_int8_scale(bound: torch.Tensor | float, eps: float = 1e-8) -> torch.Tensor:
    """Static symmetric int8 scale for activations bounded by ``bound`` (absmax or a percentile).

    Returns a 0-dim fp32 tensor ``max(bound, eps) / 127``.
    """
    bound = torch.as_tensor(bound, dtype=torch.float32)
    if bound.numel() != 1:
        raise ValueError(f"expected a scalar bound, got shape {tuple(bound.shape)}")
    return (bound.reshape(()).clamp(min=eps) / INT8_MAX).to(torch.float32)


def quantize_int8_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / scale), -128, 127)`` as int8, same shape as ``x``.

    ``round`` is round-half-to-even (``torch.round``), applied to the fp32
    value ``x * (1 / scale)``.
    """
    if not x.is_floating_point():
        raise TypeError(f"expected a floating point activation, got {x.dtype}")
    v = to_int8_domain(x, scale)
    return v.round_().clamp_(INT8_MIN, INT8_MAX).to(torch.int8)


def to_int8_domain(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 / scale)`` as a fresh fp32 tensor (safe to modify in place), differentiable.

    Shared by the real quantizer and the QAT fake quantizer so that both round
    the very same fp32 values.  fp32 on purpose: computed in bf16, ``x /
    scale`` would be rounded to 8 significant bits before the int8 rounding,
    off by up to one int8 step for |q| > 64.  ``1 / scale`` (not a division)
    matches torchao's ``quantize_affine``.
    """
    inv = torch.reciprocal(scale.to(device=x.device, dtype=torch.float32)).reshape(())
    if x.dtype == torch.float32:
        return x * inv
    return x.to(torch.float32).mul_(inv)


# ------------------------------------------------------------------------- int8 GEMM


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 ``(M, K)`` @ int8 ``(K, N)`` -> exact int32 ``(M, N)``.

    DISPATCH POINT: on CPU ``torch._int_mm`` has no shape constraints (checked
    on torch 2.13: any M >= 1, any K, N; strided operands accepted) and runs on
    oneDNN (AMX / VNNI where available).  On CUDA it needs M > 16 and K, N
    multiples of 8, so we zero-pad there; a torchao int8 kernel could be
    plugged in here instead.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_mm expects int8 operands, got {a.dtype} and {b.dtype}")
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    return _int_mm_padded_cuda(a, b)


def _int_mm_padded_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    pm = max(17, m)
    pk = -(-k // 8) * 8
    pn = -(-n // 8) * 8
    if (pm, pk, pn) == (m, k, n):
        return torch._int_mm(a, b)
    a_p = torch.nn.functional.pad(a, (0, pk - k, 0, pm - m))
    b_p = torch.nn.functional.pad(b, (0, pn - n, 0, pk - k))
    return torch._int_mm(a_p, b_p)[:m, :n]


def int8_int4_linear(
    x_q: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    chunk_n: int = INT8_MM_CHUNK_N,
    weight_x16: torch.Tensor | None = None,
) -> torch.Tensor:
    """Real W4A8 linear: ``(x_q @ q_w.T) * col_scale + bias`` with an int32 GEMM.

    Args:
        x_q: int8 activations ``(M, K)``.
        packed: uint8 packed int4 weight ``(N, K/2)`` (per-output-channel scales).
        col_scale: fp32 ``(N,)``, ``input_scale * weight_scale`` per output column.
        bias: optional ``(N,)``.
        out_dtype: dtype of the result.
        chunk_n: output columns per GEMM step (cache blocking).
        weight_x16: optional cached ``16 * q_w`` int8 ``(N, K)`` to skip unpacking.

    Returns:
        ``(M, N)`` tensor of ``out_dtype``.

    The GEMM runs on ``16 * q_w`` (one unpack op per half, see
    :func:`unpack_int4_x16`); the 1/16 is folded into the column scale, which
    is exact.  The int32 accumulator is exact; the result is rounded once in
    fp32 then once to ``out_dtype``.
    """
    m, k = x_q.shape
    n = packed.shape[0]
    if packed.shape[1] * 2 != k:
        raise ValueError(f"activation K={k} does not match packed weight K={packed.shape[1] * 2}")
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if x_q.device.type == "meta":
        return out
    scale16 = col_scale.to(torch.float32) * (1.0 / 16.0)
    bias32 = None if bias is None else bias.to(torch.float32)
    step = max(1, min(chunk_n, n))
    buf = None if weight_x16 is not None else torch.empty(step, k, dtype=torch.int8, device=x_q.device)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        if weight_x16 is not None:
            w16 = weight_x16[c0:c1]
        else:
            w16 = unpack_int4_x16(packed[c0:c1], out=buf[: c1 - c0])
        acc = int8_mm(x_q, w16.t())  # (M, c) int32
        _rescale_into(acc, scale16[c0:c1], None if bias32 is None else bias32[c0:c1], out[:, c0:c1])
    return out


def _rescale_into(
    acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dst: torch.Tensor
) -> None:
    """``dst = acc * scale + bias`` computed in fp32, rounded once into ``dst``'s dtype."""
    accf = acc.to(torch.float32)
    if dst.dtype == torch.float32:
        if bias is None:
            torch.mul(accf, scale, out=dst)
        else:
            torch.addcmul(bias, accf, scale, out=dst)
        return
    if bias is None:
        accf.mul_(scale)
    else:
        torch.addcmul(bias, accf, scale, out=accf)
    dst.copy_(accf)
