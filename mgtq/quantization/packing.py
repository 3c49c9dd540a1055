"""Two signed 4-bit integers per byte.

Layout ("split halves"): for a last dimension of length K (even), byte ``j``
(``0 <= j < K/2``) holds element ``j`` in its low nibble and element
``j + K/2`` in its high nibble, both as 4-bit two's complement::

    packed[..., j] = (q[..., j] & 0xF) | (q[..., j + K/2] << 4)

Why not the usual interleaved layout (elements 2j, 2j+1 in one byte)?  With
split halves every unpacking step writes one *contiguous* half of each output
row, so unpacking is two vectorised torch ops writing straight into the
destination, with no interleaving copy.  Unpacking runs on every forward of a
quantized linear layer, so this matters more than the packing cost (offline).

Two unpackers are offered:

* :func:`unpack_int4` -- the exact values ``q`` (int8 in [-8, 7]);
* :func:`unpack_int4_times16` -- ``16 * q`` (int8 in [-128, 112]).  Because the
  nibbles already sit in the top 4 bits after one shift / mask, this needs
  only one op per half and no sign-extension shift.  Kernels fold the 1/16
  into their scale, which is exact in floating point (a power of two).
"""

from __future__ import annotations

import torch

INT4_MIN = -8
INT4_MAX = 7

__all__ = [
    "INT4_MIN",
    "INT4_MAX",
    "pack_int4",
    "unpack_int4",
    "unpack_int4_times16",
]


def _check_packable(q: torch.Tensor) -> None:
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects an int8 tensor, got {q.dtype}")
    if q.dim() == 0:
        raise ValueError("pack_int4 expects at least one dimension")
    if q.shape[-1] % 2 != 0:
        raise ValueError(
            f"pack_int4 needs an even last dimension to put two values per byte, got K={q.shape[-1]}"
        )
    if q.numel() and q.device.type != "meta":
        lo, hi = int(q.min()), int(q.max())
        if lo < INT4_MIN or hi > INT4_MAX:
            raise ValueError(f"values must lie in [{INT4_MIN}, {INT4_MAX}], got [{lo}, {hi}]")


def _check_packed(packed: torch.Tensor) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 packed tensor, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed tensor needs at least one dimension")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values two per byte (split-halves layout, see module doc).

    Args:
        q: int8 tensor of shape ``(..., K)``, K even, values in [-8, 7].

    Returns:
        uint8 tensor of shape ``(..., K // 2)``, contiguous.
    """
    _check_packable(q)
    half = q.shape[-1] // 2
    lo = q[..., :half] & 0xF
    hi = q[..., half:] << 4  # int8 shift wraps, keeping the low 4 bits of q in the top nibble
    return (lo | hi).view(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`.

    Args:
        packed: uint8 tensor ``(..., K // 2)``.
        out: optional int8 destination ``(..., K)`` (e.g. a reused buffer).

    Returns:
        int8 tensor ``(..., K)`` with values in [-8, 7].
    """
    _check_packed(packed)
    p = packed.view(torch.int8)
    if out is None:
        # Out-of-place: torch.compile traces this without a graph break (it
        # cannot trace ``out=`` into a non-contiguous view), and fuses it.
        # Arithmetic right shifts on int8 sign-extend the nibble for free.
        return torch.cat([(p << 4) >> 4, p >> 4], dim=-1)
    out = _alloc_unpacked(packed, out)
    half = packed.shape[-1]
    torch.bitwise_right_shift(p, 4, out=out[..., half:])
    lo = out[..., :half]
    torch.bitwise_left_shift(p, 4, out=lo)
    lo.bitwise_right_shift_(4)
    return out


def unpack_int4_times16(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unpack to ``16 * q`` as int8: one op per half, no sign extension needed.

    ``16 * q`` lies in [-128, 112] so it fits int8 exactly; it is the operand
    the int8 GEMM and the dequantizer use (with scale / 16).

    Args:
        packed: uint8 tensor ``(..., K // 2)``.
        out: optional int8 destination ``(..., K)``.

    Returns:
        int8 tensor ``(..., K)`` equal to ``16 * unpack_int4(packed)``.
    """
    _check_packed(packed)
    p = packed.view(torch.int8)
    if out is None:  # out-of-place, compile-friendly (see unpack_int4)
        return torch.cat([p << 4, p & -16], dim=-1)  # -16 == 0xF0: the high nibble kept in place
    out = _alloc_unpacked(packed, out)
    half = packed.shape[-1]
    torch.bitwise_left_shift(p, 4, out=out[..., :half])  # low nibble moved to the top
    torch.bitwise_and(p, -16, out=out[..., half:])
    return out


def _alloc_unpacked(packed: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    shape = (*packed.shape[:-1], packed.shape[-1] * 2)
    if out is None:
        return torch.empty(shape, dtype=torch.int8, device=packed.device)
    if out.dtype != torch.int8 or tuple(out.shape) != shape:
        raise ValueError(f"out must be int8 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    return out
