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

Reference kernels (plain torch ops, cache-blocked for CPU; which one runs
where is decided in :mod:`mgtq.quantization.kernels`):

* :func:`dequantize_int4_weight` -- packed int4 -> float weight, in row
  blocks (``DEQUANT_CHUNK_ELEMS``) reusing small int8 / fp32 buffers;
* :func:`quantize_int8_per_tensor` -- float activation -> int8, in row blocks;
* :func:`int8_int4_linear` -- int8 activations x packed int4 weights through a
  real int8 x int8 -> int32 GEMM (``torch._int_mm``), chunked over output
  columns so the int32 accumulator and the rescale epilogue stay in cache;
* :func:`onednn_int8_linear` -- opt-in CPU path on an int8 weight prepacked
  for oneDNN, rescale / bias / cast fused into the GEMM.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import Union

import torch

from mgtq.fused import onednn_post_op

from .packing import INT4_MAX, INT4_MIN, unpack_int4, unpack_int4_times16

__all__ = [
    "INT8_MIN",
    "INT8_MAX",
    "MappingLike",
    "check_group_size",
    "quantize_int4_weight",
    "dequantize_int4_weight",
    "choose_int8_scale",
    "quantize_int8_per_tensor",
    "to_int8_domain",
    "int8_mm",
    "int8_int4_linear",
    "onednn_int8_linear_available",
    "onednn_int8_linear_problem",
    "onednn_prepack_int8_weight",
    "onednn_int8_linear",
]

INT8_MIN = -128
INT8_MAX = 127

# Cache blocking of the elementwise CPU kernels (element counts per block):
# activation quantization stages 256K fp32 elements (1 MB, stays in L2);
# dequantization too (1 MB fp32 stage + its int8 and bf16 blocks fit a 2 MB L2;
# 4 MB stages spill to L3 and cost about a third more CPU time per weight on one
# thread, smaller blocks pay more per-op overhead).  Both stay far below glibc's
# 32 MB mmap threshold, beyond which every call would page-fault a fresh buffer.
QUANT_CHUNK_ELEMS = 1 << 18
DEQUANT_CHUNK_ELEMS = 1 << 18
# Output columns per CPU int8 GEMM call: the (M x 256) int32 accumulator and
# its rescale epilogue stay in cache instead of streaming through memory.
INT8_MM_CHUNK_N = 256
# At most this many rows (adaLN, embedders: M = batch) the weight is read
# once, so int8-weight GEMV kernels beat materialising a float weight.
SMALL_M = 16

# Weight mappings, by torchao ``MappingType`` name.  Passed around as names (a
# torchao ``MappingType`` member is accepted too) so that importing mgtq's
# inference path does not import torchao (~3-6 s); torchao is imported when
# weights are actually quantized.
MappingLike = Union[str, Enum]
_SUPPORTED_MAPPINGS = ("SYMMETRIC", "SYMMETRIC_NO_CLIPPING_ERR")


def mapping_name(mapping_type: MappingLike) -> str:
    """``"SYMMETRIC"`` / ``"SYMMETRIC_NO_CLIPPING_ERR"`` from a name or a torchao ``MappingType``."""
    name = mapping_type.name if isinstance(mapping_type, Enum) else str(mapping_type).upper()
    if name not in _SUPPORTED_MAPPINGS:
        raise ValueError(f"only symmetric mappings {_SUPPORTED_MAPPINGS} are supported, got {mapping_type}")
    return name


# --------------------------------------------------------------------------- weights


def check_group_size(value: int | None, where: str, none: str = "None") -> None:
    """The one rule for a configured int4 group size: ``None`` (one scale per output channel) or an even integer
    ≥ 2; whether it divides a layer's K is `resolve_group_size`'s check. ``where`` names the setting in the
    ValueError ("W4A16Config.group_size", "qat.group_size"); ``none`` is how its source spells None ("null" in
    a YAML recipe or a JSON manifest)."""
    if value is not None and (value < 2 or value % 2):
        raise ValueError(f"{where} must be {none} (one scale per output channel) or an even integer ≥ 2 such as "
                         f"32, 64 or 128, got {value!r}")


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
    mapping_type: MappingLike = "SYMMETRIC",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 quantization of a linear weight with torchao's primitives.

    Args:
        weight: float tensor ``(N, K)`` (out_features, in_features).
        group_size: K-elements sharing one scale; ``None`` = per output channel.
        mapping_type: torchao ``MappingType`` (or its name): ``SYMMETRIC``
            (``absmax / 7.5``, same as torchao's int4 QAT fake quantizer) or
            ``SYMMETRIC_NO_CLIPPING_ERR``.

    Returns:
        ``(q, scale)``: int8 ``(N, K)`` with values in [-8, 7] and fp32 scales
        ``(N, K // group_size)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight, got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating point weight, got {weight.dtype}")
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    mapping = getattr(MappingType, mapping_name(mapping_type))
    n, k = weight.shape
    g = resolve_group_size(k, group_size)
    block = (1, g)
    # Scales are kept in fp32 whatever the weight dtype: exact agreement with the
    # fake quantizer, and their cost is small (4 bytes per group).
    scale, zero_point = choose_qparams_affine(
        weight, mapping, block, torch.int8, INT4_MIN, INT4_MAX, scale_dtype=torch.float32
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
    chunk_elems: int = DEQUANT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Packed int4 ``(N, K/2)`` + scales ``(N, G)`` -> float weight ``(N, K)`` in ``dtype``.

    Equals ``(q.float() * scale).to(dtype)`` exactly: ``16 * q`` times ``scale
    / 16`` (a power-of-two rescale, exact) in fp32, rounded once to ``dtype``.
    Works through row blocks of about ``chunk_elems`` elements, reusing one
    int8 and one fp32 buffer (see ``DEQUANT_CHUNK_ELEMS`` for the size).
    """
    _check_weight_pair(packed, scale)
    n, half = packed.shape
    k = 2 * half
    groups = scale.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if packed.device.type == "meta" or n == 0:
        return out
    scale16 = (scale.to(torch.float32) * (1.0 / 16.0)).unsqueeze(-1)  # (N, G, 1)
    rows = max(1, min(n, chunk_elems // k))
    buf8 = torch.empty(rows, k, dtype=torch.int8, device=packed.device)
    # fp32 staging keeps the product exact before the single rounding to dtype.
    stage = None if dtype == torch.float32 else torch.empty(rows, k, dtype=torch.float32, device=packed.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        q_times16 = unpack_int4_times16(packed[r0:r1], out=buf8[: r1 - r0])
        f = out[r0:r1] if stage is None else stage[: r1 - r0]
        f.copy_(q_times16)
        f.view(r1 - r0, groups, k // groups).mul_(scale16[r0:r1])
        if stage is not None:
            out[r0:r1].copy_(f)
    return out


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


def quantize_int8_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, chunk_elems: int = QUANT_CHUNK_ELEMS
) -> torch.Tensor:
    """``clamp(round(x / scale), -128, 127)`` as int8, same shape as ``x``.

    ``round`` is round-half-to-even (``torch.round``) of the fp32 value ``x *
    (1 / scale)`` (see :func:`to_int8_domain`).  Row blocks of about
    ``chunk_elems`` elements go through one reused fp32 buffer: four cheap
    in-cache passes instead of four passes over a large fresh temporary.
    """
    if not x.is_floating_point():
        raise TypeError(f"expected a floating point activation, got {x.dtype}")
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel() == 0 or x.device.type == "meta":
        return out
    k = x.shape[-1] if x.dim() else 1
    x2 = x.reshape(-1, k)
    o2 = out.view(-1, k)
    m = x2.shape[0]
    inv = torch.reciprocal(scale.to(device=x.device, dtype=torch.float32)).reshape(())
    rows = max(1, min(m, chunk_elems // k))
    buf = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    with torch.no_grad():  # integer output: nothing to differentiate
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            f = buf[: r1 - r0]
            if x2.dtype == torch.float32:
                torch.mul(x2[r0:r1], inv, out=f)
            else:
                f.copy_(x2[r0:r1])  # upcast first: the product is rounded in fp32
                f.mul_(inv)
            f.round_().clamp_(INT8_MIN, INT8_MAX)
            o2[r0:r1].copy_(f)
    return out


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


def int8_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 ``(M, K)`` @ int8 ``(K, N)`` -> exact int32 ``(M, N)`` (into ``out`` if given).

    CPU only here: ``torch._int_mm`` has no shape constraints on CPU (any M,
    K, N; strided operands).  CUDA's constraints are handled in
    :mod:`mgtq.quantization.kernels`.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_mm expects int8 operands, got {a.dtype} and {b.dtype}")
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)


def int8_int4_linear(
    x_q: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    chunk_n: int = INT8_MM_CHUNK_N,
    weight_times16: torch.Tensor | None = None,
) -> torch.Tensor:
    """Real W4A8 linear: ``(x_q @ q_w.T) * col_scale + bias`` with an int32 GEMM.

    Args:
        x_q: int8 activations ``(M, K)``.
        packed: uint8 packed int4 weight ``(N, K/2)`` (per-output-channel scales).
        col_scale: fp32 ``(N,)``, ``input_scale * weight_scale`` per output column.
        bias: optional ``(N,)``.
        out_dtype: dtype of the result.
        chunk_n: output columns per GEMM call (cache blocking).
        weight_times16: optional cached ``16 * q_w`` int8 ``(N, K)`` to skip unpacking.

    Returns:
        ``(M, N)`` tensor of ``out_dtype``.

    The GEMM runs on ``16 * q_w`` (one unpack op per half, see
    :func:`unpack_int4_times16`) straight from a transposed view (the (K, N)
    operand ``_int_mm`` wants, no copy); the 1/16 is folded into the column
    scale, which is exact.  The int32 accumulator is exact; the result is
    rounded once in fp32, then once to ``out_dtype``.
    """
    m, k = x_q.shape
    n = packed.shape[0]
    if packed.shape[1] * 2 != k:
        raise ValueError(f"activation K={k} does not match packed weight K={packed.shape[1] * 2}")
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if x_q.device.type == "meta" or m == 0:
        return out
    scale16 = col_scale.to(torch.float32) * (1.0 / 16.0)
    bias32 = None if bias is None else bias.to(torch.float32)
    step = max(1, min(chunk_n, n))
    w_buf = None if weight_times16 is not None else torch.empty(step, k, dtype=torch.int8, device=x_q.device)
    # Reused per-chunk buffers (flat, so a narrower last chunk still gets a
    # contiguous view): no allocator churn inside the loop.
    acc_buf = torch.empty(m * step, dtype=torch.int32, device=x_q.device)
    # fp32 staging for the epilogue unless the output itself is fp32.
    stage_buf = None if out_dtype == torch.float32 else torch.empty(m * step, dtype=torch.float32, device=x_q.device)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        c = c1 - c0
        if weight_times16 is not None:
            q_times16 = weight_times16[c0:c1]
        else:
            q_times16 = unpack_int4_times16(packed[c0:c1], out=w_buf[:c])
        acc = int8_mm(x_q, q_times16.t(), out=acc_buf[: m * c].view(m, c))  # (M, c) int32, exact
        dst = out[:, c0:c1]
        f = dst if stage_buf is None else stage_buf[: m * c].view(m, c)
        f.copy_(acc)
        if bias32 is None:
            f.mul_(scale16[c0:c1])
        else:
            torch.addcmul(bias32[c0:c1], f, scale16[c0:c1], out=f)
        if stage_buf is not None:
            dst.copy_(f)
    return out


# ------------------------------------------------------- opt-in oneDNN W4A8 (CPU)


def onednn_int8_linear_available(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`onednn_prepack_int8_weight` and mgtq's op over it can be used (see
    :func:`onednn_int8_linear_problem`)."""
    return onednn_int8_linear_problem(device) is None


def onednn_int8_linear_problem(device: torch.device | str = "cpu") -> str | None:
    """Why the opt-in oneDNN int8 weight cache cannot run on ``device`` here, or None where it can."""
    if torch.device(device).type != "cpu":
        return "oneDNN's int8 linear runs on the CPU only"
    has_ops = all(hasattr(torch.ops.onednn, name) for name in ("qlinear_prepack", "qlinear_pointwise"))
    if not (torch.backends.mkldnn.is_available() and has_ops):
        return "this torch build has no oneDNN int8 linear (an x86 CPU build of torch has it)"
    if not _onednn_weight_cache_runs():
        return (f"torch {torch.__version__} cannot run it: it needs torch 2.11 or newer (oneDNN's linear takes int8 "
                "activations from 2.7, a custom op takes its prepacked weight from 2.11)")
    return None


@functools.lru_cache(maxsize=None)
def _onednn_weight_cache_runs() -> bool:
    """Whether one tiny int8 linear runs through mgtq's op on a prepacked weight, as the cache's kernels call it.

    The ops exist in older torch, which fails only when called: before 2.7 oneDNN's linear takes uint8 activations
    only, before 2.11 a custom op cannot take its opaque prepacked weight ("Cannot access storage of
    OpaqueTensorImpl"). Tried once, on what the cache needs, rather than read from the version.
    """
    from .kernels import onednn_int8_linear_op  # (kernels imports this module)

    try:
        weight = onednn_prepack_int8_weight(torch.zeros(8, 16, dtype=torch.uint8))  # int4 (N=8, K=32), packed
        onednn_int8_linear_op(torch.ones(1, 32, dtype=torch.int8), torch.tensor(1.0), weight, torch.ones(8), None,
                              torch.float32, "")
    except Exception:  # noqa: BLE001 (whatever this torch raises, the cache cannot run here)
        return False
    return True


def onednn_prepack_int8_weight(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int4 -> int8 ``(N, K)`` and reorder it into oneDNN's blocked int8 layout (opaque tensor).

    This is an int8 copy of the weight (2x the int4 bytes): opt-in only.  The
    result is an opaque MKLDNN tensor -- not a state-dict tensor, not
    deep-copyable, not movable across devices.
    """
    return torch.ops.onednn.qlinear_prepack(unpack_int4(packed), None)


def onednn_int8_linear(
    x_q: torch.Tensor,
    input_scale: torch.Tensor,
    prepacked: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str | None = None,
) -> torch.Tensor:
    """W4A8 through oneDNN's int8 linear (AMX/VNNI) with the rescale + bias + cast fused in.

    Same math as :func:`int8_int4_linear` (int32 accumulation, one fp32
    rescale ``input_scale * weight_scale``, bias, cast) but no int32
    accumulator round-trips through memory.  ``x_q`` int8 ``(M, K)``
    contiguous; ``weight_scale`` fp32 ``(N,)``.  ``activation``
    (:data:`mgtq.fused.ACTIVATIONS`): applied to the fp32 result before the cast.
    """
    post_op, algorithm = onednn_post_op(activation)
    n = weight_scale.shape[0]
    zero_points = torch.zeros(n, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        x_q.contiguous(),
        float(input_scale),
        0,
        prepacked,
        weight_scale.to(torch.float32).contiguous(),
        zero_points,
        None if bias is None else bias.to(torch.float32),
        1.0,
        0,
        out_dtype,
        post_op,
        [],
        algorithm,
    )
