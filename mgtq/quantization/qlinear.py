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

``weight_packed`` is a frozen ``nn.Parameter`` (not a buffer) so that
accelerate's ``cpu_offload`` / model offload move it like any weight; the
keys and tensors are the same either way.  Which kernel multiplies is decided
in :mod:`mgtq.quantization.kernels`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mgtq.fused import fuses_activations

from . import kernels
from .packing import pack_int4, unpack_int4_times16
from .qtensor import (
    INT8_MM_CHUNK_N,
    MappingLike,
    dequantize_int4_weight,
    onednn_int8_linear_available,
    onednn_int8_linear_problem,
    onednn_prepack_int8_weight,
    quantize_int4_weight,
    resolve_group_size,
    tensor_nbytes,
)

__all__ = ["W4Linear", "W4A8Linear", "QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """Shared storage of packed int4 weights; not used directly.

    ``weight_scale`` (and ``input_scale``) stay fp32 through
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
        self.weight_packed = nn.Parameter(
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False
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
        self.weight_packed = nn.Parameter(pack_int4(q).to(self.weight_packed.device), requires_grad=False)
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
        if x.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"quantized layers compute in float32, bfloat16 or float16, got a {x.dtype} input; cast "
                            "the model (pipe.to(torch.float32), say)")


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take


class W4Linear(QuantizedLinear):
    """int4-weight, float-activation linear layer (W4A16).

    Forward: ``x @ (q * scale).T + bias`` for fp32 / bf16 / fp16 ``x (...,
    in_features)``, through the kernel :func:`~mgtq.quantization.kernels.choose_kernel`
    picks (dequantize + GEMM, or an int8-weight GEMV for a few rows).

    Opt-in :meth:`prepare_tinygemm` (CUDA, bf16) adds tinygemm's tiled copy
    of the weight (+0.5 byte per weight, never saved) for
    ``torch._weight_int4pack_mm``.
    """

    _TRANSIENT = ("_tinygemm",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._tinygemm: tuple[torch.Tensor, torch.Tensor] | None = None

    @fuses_activations  # in the GEMM epilogue where the kernel allows it (mgtq.models.layers.linear_act)
    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        self._check_input(x)
        return kernels.w4a16_linear(x, self.weight_packed, self.weight_scale, self.bias, tinygemm=self._tinygemm,
                                    activation=activation)

    def prepare_tinygemm(self) -> None:
        """Derive tinygemm's weight layout (CUDA only; an extra int4 copy, not saved, dropped on a device move)."""
        self._tinygemm = kernels.prepare_tinygemm(self.weight_packed, self.weight_scale)

    def weight_nbytes(self) -> int:
        """Packed int4 + scales, plus tinygemm's copy when prepared."""
        extra = 0 if self._tinygemm is None else sum(tensor_nbytes(t) for t in self._tinygemm)
        return super().weight_nbytes() + extra

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self._tinygemm is not None and self._tinygemm[0].device != self.weight_packed.device:
            self._tinygemm = None  # a derived layout: re-prepare on the new device
        return result

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

    The weight stays packed (K/2 bytes per row); the kernel per device and
    row count is chosen in :mod:`mgtq.quantization.kernels` (one ``_int_mm``
    with fused quantize / epilogue on CUDA, a column-chunked ``_int_mm`` on CPU,
    an exact int8-weight GEMV for a few rows).

    Opt-in :meth:`enable_weight_cache` trades memory for speed by keeping an
    int8 copy of the weight (+1 byte per weight, i.e. 3x the int4 bytes in
    total; still below bf16): on CPU with oneDNN, prepacked for oneDNN's int8
    linear, which fuses the rescale/bias/cast epilogue (eager and compiled: the
    opaque oneDNN tensor enters a compiled graph as an argument of one custom
    op); elsewhere as the plain unpacked int8 operand.  The cache is
    never saved, is dropped on deepcopy/pickle, oneDNN's when the module leaves the CPU, and both on devices
    other than the CPU and CUDA (mps, xpu), whose kernel reads none.
    """

    _FP32_BUFFERS = ("weight_scale", "input_scale")
    _TRANSIENT = ("_onednn_weight", "_weight_times16")

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
        # Caches are plain attributes, not buffers: never saved, and offload
        # hooks (which move every buffer) must not meet a None buffer.
        self._weight_times16: torch.Tensor | None = None
        self._onednn_weight: torch.Tensor | None = None  # opaque MKLDNN tensor, never a buffer

    def extra_repr(self) -> str:
        scale = "meta" if self.input_scale.is_meta else f"{float(self.input_scale):.4g}"
        return f"{super().extra_repr()}, input_scale={scale}, weight_cache={self.weight_cache}"

    @fuses_activations  # oneDNN's epilogue with the oneDNN weight cache, after the GEMM otherwise
    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        self._check_input(x)
        # Offload hooks move parameters and buffers to the input's device, not these cached copies: one left on
        # another device is not read (the kernel unpacks per call, as without a cache).
        onednn, times16 = self._onednn_weight, self._weight_times16
        return kernels.w4a8_linear(
            x, self.weight_packed, self.weight_scale, self.input_scale, self.bias,
            onednn_weight=onednn if onednn is not None and x.device.type == "cpu" else None,
            weight_times16=times16 if times16 is not None and times16.device == x.device else None,
            chunk_n=self.chunk_n, activation=activation,
        )

    # ------------------------------------------------------------------ int8 weight cache (opt-in)
    @property
    def weight_cache(self) -> str | None:
        """``"onednn"``, ``"int8"`` or ``None``."""
        if self._onednn_weight is not None:
            return "onednn"
        return None if self._weight_times16 is None else "int8"

    def enable_weight_cache(self, backend: str = "auto") -> None:
        """Keep an int8 copy of the weight (+1 byte/weight, not saved) to skip per-call unpacking.

        Args:
            backend: ``"onednn"`` (CPU: prepacked for oneDNN's fused int8
                linear), ``"int8"`` (plain ``16 * q`` int8 operand for
                ``_int_mm``), or ``"auto"`` (oneDNN where the CPU class has int8
                dot products and oneDNN is available, see
                :func:`~mgtq.quantization.kernels.weight_cache_backend`; no cache on
                devices other than the CPU and CUDA, whose kernel reads none).
        """
        self.disable_weight_cache()
        if self.weight_packed.device.type not in kernels.INTEGER_KERNEL_DEVICES:
            if backend != "auto":
                raise ValueError(f"no W4A8 kernel on {self.weight_packed.device.type!r} reads a weight cache; "
                                 "enable it on the CPU or CUDA, or use backend='auto' (no cache here)")
            return  # fp32_exact unpacks per call: a cache would only cost memory
        if backend == "auto":
            on_cpu = self.weight_packed.device.type == "cpu"
            backend = ("onednn" if on_cpu and onednn_int8_linear_available(self.weight_packed.device)
                       and kernels.weight_cache_backend(kernels.cpu_class()) == "onednn" else "int8")
        if backend == "onednn":
            problem = onednn_int8_linear_problem(self.weight_packed.device)
            if problem is not None:
                raise RuntimeError(f"the oneDNN weight cache cannot be used: {problem}; backend='auto' falls back "
                                   "to the int8 cache")
            self._onednn_weight = onednn_prepack_int8_weight(self.weight_packed)
        elif backend == "int8":
            self._weight_times16 = unpack_int4_times16(self.weight_packed)
        else:
            raise ValueError(f"backend must be 'auto', 'onednn' or 'int8', got {backend!r}")

    def disable_weight_cache(self) -> None:
        self._weight_times16 = None
        self._onednn_weight = None

    def weight_nbytes(self) -> int:
        """Packed int4 + scales + input scale, plus the int8 cache when enabled (N*K bytes)."""
        cache = 0 if self.weight_cache is None else self.out_features * self.in_features
        return super().weight_nbytes() + cache

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self._onednn_weight is not None and self.weight_packed.device.type != "cpu":
            self._onednn_weight = None  # oneDNN's layout is CPU-only
        if self._weight_times16 is not None and self.weight_packed.device.type not in kernels.INTEGER_KERNEL_DEVICES:
            self._weight_times16 = None  # no kernel there reads it
        elif self._weight_times16 is not None and self._weight_times16.device != self.weight_packed.device:
            self._weight_times16 = self._weight_times16.to(self.weight_packed.device)
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
