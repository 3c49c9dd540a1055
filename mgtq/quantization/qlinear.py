"""Quantized ``nn.Linear`` replacements doing real low-bit inference.

* :class:`W4Linear` -- int4 weights (per channel or groupwise), float
  activations (W4A16): the weight is dequantized to the input dtype at use.
* :class:`W4A8Linear` -- int4 per-channel weights, int8 activations with a
  static per-tensor scale: a real int8 x int8 -> int32 GEMM.

State dicts hold tensors only (safetensors-friendly)::

    W4Linear:   weight_packed uint8 (N, K/2), weight_scale fp32 (N, K/group_size), [bias (N,)]
    W4A8Linear: weight_packed uint8 (N, K/2), weight_scale fp32 (N, 1), input_scale fp32 (), [bias (N,)]

``group_size`` is implied by the shape of ``weight_scale``; use
:meth:`from_state_dict` to rebuild a module from tensors alone.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .packing import pack_int4, unpack_int4_x16
from .qtensor import (
    INT8_MM_CHUNK_N,
    MappingLike,
    PackedInt4Weight,
    dequantize_int4_weight,
    int4_weight_only_linear,
    int8_int4_linear,
    onednn_int8_linear,
    onednn_int8_linear_available,
    onednn_prepack_int8_weight,
    quantize_int4_weight,
    quantize_int8_per_tensor,
    resolve_group_size,
    tensor_nbytes,
)

__all__ = ["W4Linear", "W4A8Linear", "QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """Shared storage of packed int4 weights; not used directly.

    Buffers ``weight_scale`` (and ``input_scale``) stay fp32 through
    ``module.to(torch.bfloat16)``: rounding a scale to bf16 would silently
    change every output (see :meth:`_apply`).
    """

    _FP32_BUFFERS: tuple[str, ...] = ("weight_scale",)
    # Opt-in accelerators (e.g. opaque oneDNN tensors): neither
    # picklable nor deep-copyable, so copies come back without them.
    _TRANSIENT: tuple[str, ...] = ()

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if in_features % 2 != 0:
            raise ValueError(f"int4 packing needs an even in_features, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = resolve_group_size(in_features, group_size)
        groups = in_features // self.group_size
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        if bias:
            # A frozen Parameter (not a buffer) so code that walks parameters
            # (dtype/device probing in diffusers) still sees the module.
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ accounting
    def weight_nbytes(self) -> int:
        """Bytes really held for the weight: packed int4 + scales (+ input scale); bias excluded."""
        total = tensor_nbytes(self.weight_packed) + tensor_nbytes(self.weight_scale)
        return total + tensor_nbytes(getattr(self, "input_scale", None))

    def quantized_weight(self) -> PackedInt4Weight:
        """The quantized weight as a :class:`PackedInt4Weight` view (no copy).

        (Deliberately not called ``weight``: code probing ``module.weight.dtype``
        must not mistake this module for a float linear.)
        """
        return PackedInt4Weight(self.weight_packed, self.weight_scale)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``(N, K)`` weight this module computes with."""
        return dequantize_int4_weight(self.weight_packed, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )

    # ------------------------------------------------------------------ construction
    def _load_quantized(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight_packed = pack_int4(q).to(self.weight_packed.device)
        self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32).contiguous()
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def _shape_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
        try:
            packed = state_dict[prefix + "weight_packed"]
            scale = state_dict[prefix + "weight_scale"]
        except KeyError as err:
            raise KeyError(f"state dict has no {err.args[0]!r}; is it a {cls.__name__} checkpoint?") from None
        in_features = packed.shape[1] * 2
        bias = state_dict.get(prefix + "bias")
        return dict(
            in_features=in_features,
            out_features=packed.shape[0],
            bias=bias is not None,
            group_size=in_features // scale.shape[1],
            bias_dtype=bias.dtype if bias is not None else torch.float32,
        )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "", device: torch.device | str | None = None
    ) -> "QuantizedLinear":
        """Build a module from its tensors only (no float weight is ever created).

        The module is built on the meta device, then the tensors are assigned
        (moved to ``device`` if given).
        """
        kwargs = cls._shape_from_state_dict(state_dict, prefix)
        module = cls(**kwargs, device="meta")
        own = {k: state_dict[prefix + k] for k in module.state_dict().keys()}
        if device is not None:
            own = {k: v.to(device) for k, v in own.items()}
        module.load_state_dict(own, assign=True)
        return module

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(dtype) casts every floating buffer; keep scales in fp32
        # (only follow the device change) so outputs do not silently drift.
        saved = {name: getattr(self, name) for name in self._FP32_BUFFERS}
        result = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return result

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._TRANSIENT:
            state[name] = None
        return state

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating point input, got {x.dtype}")

    def _bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


class W4Linear(QuantizedLinear):
    """int4-weight, float-activation linear layer (W4A16).

    Forward: ``F.linear(x, dequant(W).to(x.dtype), bias)``; works for fp32 /
    bf16 / fp16 inputs of shape ``(..., in_features)``.  The float weight
    exists only during the call, built in cache-sized row blocks.  For at
    most :data:`~mgtq.quantization.qtensor.SMALL_M` rows with per-channel
    scales (e.g. adaLN projections, M = batch) the CPU path multiplies the
    int8-unpacked weight directly (``torch._weight_int8pack_mm``) instead.
    See :func:`~mgtq.quantization.qtensor.int4_weight_only_linear` for the
    CUDA dispatch point.

    ``torch.compile`` of the dequantizer (Inductor works here with gcc) fuses
    its five passes into one -- ~1.8x faster dequantization in isolation, but
    no measurable gain per layer (dequantization is ~10% of a layer at
    M=2202), so mgtq does not ship it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return int4_weight_only_linear(x, self.weight_packed, self.weight_scale, self.bias)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        group_size: int | None = None,
        mapping_type: MappingLike = "SYMMETRIC",
    ) -> "W4Linear":
        """Quantize a float ``nn.Linear`` (weights only)."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            device=weight.device,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
        )
        q, scale = quantize_int4_weight(weight, module.group_size, mapping_type)
        module._load_quantized(q, scale, None if linear.bias is None else linear.bias.detach())
        return module

    @classmethod
    def from_fake_quant(cls, fq: nn.Module) -> "W4Linear":
        """Convert a :class:`~mgtq.quantization.fake_quant.FakeQuantLinear`, reproducing its weight exactly.

        Its activation fake quantizer (if any) is ignored: use
        :meth:`W4A8Linear.from_fake_quant` to keep int8 activations.
        """
        from .fake_quant import weight_qparams_of

        group_size, mapping_type = weight_qparams_of(fq)
        return cls.from_float(fq, group_size=group_size, mapping_type=mapping_type)


class W4A8Linear(QuantizedLinear):
    """int4 per-channel weights x int8 per-tensor static activations (W4A8), real integer GEMM.

    Forward on ``x (..., K)``::

        x_q = clamp(round(x * (1 / input_scale)), -128, 127).to(int8)      # (M, K)
        acc = x_q @ q_w.T                      (int8 x int8 -> int32, torch._int_mm)
        y   = (acc * (input_scale * weight_scale) + bias).to(x.dtype)

    Why per-channel only: the int32 accumulator over the full K can only be
    rescaled by one factor per output column.  Groupwise weight scales would
    need one GEMM of depth ``group_size`` per group plus a float rescale of
    each partial sum -- K/group_size epilogues over the (M, N) output, which
    costs more than the integer GEMM saves.

    The weight stays packed (K/2 bytes per row) and is unpacked per chunk of
    ``chunk_n`` output channels straight into the (K, N)-shaped int8 operand
    ``_int_mm`` wants (a transposed view, no copy).

    Opt-in :meth:`enable_weight_cache` trades memory for speed by keeping an
    int8 copy of the weight (+1 byte per weight, i.e. 3x the int4 bytes in
    total; still below bf16): on CPU with oneDNN, prepacked for oneDNN's int8
    linear, which fuses the rescale/bias/cast epilogue (the fastest CPU path);
    elsewhere as the plain unpacked int8 operand.  The cache is never saved,
    is dropped on deepcopy/pickle and when the module leaves the CPU.

    Speed on CPUs with AMX (Sapphire Rapids and later): ``torch._int_mm`` runs
    on AVX512-VNNI while the bf16 GEMM runs on AMX, so the default path is
    ~1.3-1.6x slower than a bf16 ``nn.Linear``; with the oneDNN cache it is
    ~0.6-0.95x (see ``benchmarks/bench_linear_kernels.py``).
    """

    _FP32_BUFFERS = ("weight_scale", "input_scale")
    _TRANSIENT = ("_onednn_weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
        chunk_n: int = INT8_MM_CHUNK_N,
    ) -> None:
        if group_size not in (None, in_features):
            raise ValueError(
                "W4A8Linear supports per-output-channel weight scales only "
                f"(group_size=None or {in_features}), got group_size={group_size}"
            )
        super().__init__(in_features, out_features, bias, None, device, bias_dtype)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.chunk_n = chunk_n
        self.register_buffer("_weight_x16", None, persistent=False)
        self._onednn_weight: torch.Tensor | None = None  # opaque MKLDNN tensor, never a buffer

    def extra_repr(self) -> str:
        scale = "meta" if self.input_scale.is_meta else f"{float(self.input_scale):.4g}"
        return f"{super().extra_repr()}, input_scale={scale}, weight_cache={self.weight_cache}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x_q = quantize_int8_per_tensor(x2, self.input_scale)
        if self._onednn_weight is not None and x.device.type == "cpu":
            y = onednn_int8_linear(
                x_q, self.input_scale, self._onednn_weight, self.weight_scale[:, 0], self.bias, x.dtype
            )
        else:
            # DISPATCH POINT (CUDA): torchao's int8 dynamic-activation kernels
            # could replace int8_mm + epilogue; see qtensor.int8_mm.
            y = int8_int4_linear(
                x_q,
                self.weight_packed,
                self.weight_scale[:, 0] * self.input_scale,
                self.bias,
                x.dtype,
                chunk_n=self.chunk_n,
                weight_x16=self._weight_x16,
            )
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ int8 weight cache (opt-in)
    @property
    def weight_cache(self) -> str | None:
        """``"onednn"``, ``"int8"`` or ``None``."""
        if self._onednn_weight is not None:
            return "onednn"
        return None if self._weight_x16 is None else "int8"

    def enable_weight_cache(self, backend: str = "auto") -> None:
        """Keep an int8 copy of the weight (+1 byte/weight, not saved) to skip per-call unpacking.

        Args:
            backend: ``"onednn"`` (CPU: prepacked for oneDNN's fused int8
                linear), ``"int8"`` (plain ``16 * q`` int8 operand for
                ``_int_mm``), or ``"auto"`` (oneDNN when available).
        """
        self.disable_weight_cache()
        if backend == "auto":
            backend = "onednn" if onednn_int8_linear_available(self.weight_packed.device) else "int8"
        if backend == "onednn":
            if not onednn_int8_linear_available(self.weight_packed.device):
                raise RuntimeError("oneDNN int8 linear is not available for this device / build")
            self._onednn_weight = onednn_prepack_int8_weight(self.weight_packed)
        elif backend == "int8":
            self._weight_x16 = unpack_int4_x16(self.weight_packed)
        else:
            raise ValueError(f"backend must be 'auto', 'onednn' or 'int8', got {backend!r}")

    def disable_weight_cache(self) -> None:
        self._weight_x16 = None
        self._onednn_weight = None

    def weight_nbytes(self) -> int:
        """Packed int4 + scales + input scale, plus the int8 cache when enabled (N*K bytes)."""
        cache = 0 if self.weight_cache is None else self.out_features * self.in_features
        return super().weight_nbytes() + cache

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self._onednn_weight is not None and self.weight_packed.device.type != "cpu":
            self._onednn_weight = None  # oneDNN's layout is CPU-only
        return result

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        input_scale: torch.Tensor | float,
        mapping_type: MappingLike = "SYMMETRIC",
        chunk_n: int = INT8_MM_CHUNK_N,
    ) -> "W4A8Linear":
        """Quantize a float ``nn.Linear``; ``input_scale`` is the calibrated int8 step (absmax / 127)."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=weight.device,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
            chunk_n=chunk_n,
        )
        q, scale = quantize_int4_weight(weight, None, mapping_type)
        module._load_quantized(q, scale, None if linear.bias is None else linear.bias.detach())
        module.input_scale = _as_scale(input_scale, weight.device)
        return module

    @classmethod
    def from_fake_quant(cls, fq: nn.Module, chunk_n: int = INT8_MM_CHUNK_N) -> "W4A8Linear":
        """Convert a :class:`~mgtq.quantization.fake_quant.FakeQuantLinear` with int8 activation fake quant."""
        from .fake_quant import input_scale_of, weight_qparams_of

        group_size, mapping_type = weight_qparams_of(fq)
        if group_size not in (None, fq.in_features):
            raise ValueError(f"W4A8Linear needs per-channel weights, the fake-quant layer uses group_size={group_size}")
        scale = input_scale_of(fq)
        if scale is None:
            raise ValueError("this FakeQuantLinear has no int8 activation fake quantizer; use W4Linear.from_fake_quant")
        return cls.from_float(fq, scale, mapping_type=mapping_type, chunk_n=chunk_n)


def _as_scale(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone().to(device)
    if t.numel() != 1:
        raise ValueError(f"input_scale must be a scalar, got shape {tuple(t.shape)}")
    if not t.is_meta and float(t) <= 0:
        raise ValueError(f"input_scale must be positive, got {float(t)}")
    return t.reshape(())
