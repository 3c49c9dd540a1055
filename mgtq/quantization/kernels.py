"""Which kernel multiplies a quantized Linear: one dispatch per (device, CPU class, scheme, M regime).

:func:`choose_kernel` is the only place that decides; :func:`w4a16_linear` and
:func:`w4a8_linear` run its choice.  ``M`` is the number of rows (tokens times
batch) of the call; "per-channel" means one weight scale per output channel.
The CPU class (:func:`cpu_class`: ``amx-int8``, ``amx-bf16``, ``avx512-vnni``,
``avx2``, ``generic`` for CPUs that are not x86) is read once from the CPU at run time; ``MGTQ_CPU_CLASS`` overrides it
and tests pass it in :class:`KernelContext`, as they force the CUDA branch.

| device | scheme | condition                                      | kernel           |
|--------|--------|------------------------------------------------|------------------|
| cpu    | W4A16  | amx-int8, mgtq's AMX kernel built, bf16,       | amx              |
|        |        | K % 128 == 0, N % 32 == 0, group % 16 == 0     |                  |
| cpu    | W4A16  | M <= 16, per-channel, K % 32 == 0              | int8pack         |
| cpu    | W4A16  | avx512-vnni / amx-bf16 with AVX512-BF16,       | avx512           |
|        |        | mgtq's kernels built, bf16, K % 128 == 0,      |                  |
|        |        | N % 64 == 0, group % 16 == 0                   |                  |
| cpu    | W4A16  | avx2 / generic, bf16 / fp16 activations        | dequant_fp32     |
| cpu    | W4A16  | compiling                                      | dequant_inline   |
| cpu    | W4A16  | otherwise                                      | dequant          |
| cpu    | W4A8   | oneDNN weight cache (amx-int8), compiling,     | onednn_inline    |
|        |        | mgtq's AMX kernels not built                   |                  |
| cpu    | W4A8   | oneDNN weight cache (amx-int8)                 | onednn           |
| cpu    | W4A8   | amx-int8, mgtq's AMX kernels built,            | amx              |
|        |        | K % 128 == 0, N % 32 == 0                      |                  |
| cpu    | W4A8   | avx512-vnni / amx-bf16, mgtq's kernels built,  | vnni             |
|        |        | K % 128 == 0, N % 64 == 0                      |                  |
| cpu    | W4A8   | generic                                        | fp32_exact       |
| cpu    | W4A8   | M <= 16                                        | int_mm           |
| cpu    | W4A8   | compiling                                      | int_mm_chunked_inline |
| cpu    | W4A8   | otherwise                                      | int_mm_chunked   |
| cuda   | W4A16  | bf16, sm80+, tinygemm layout prepared (opt-in) | tinygemm         |
| cuda   | W4A16  | M <= 16, per-channel                           | int8pack         |
| cuda   | W4A16  | compiling                                      | dequant_inline   |
| cuda   | W4A16  | otherwise                                      | dequant          |
| cuda   | W4A8   | _int_mm supported, M > 16, K % 8 == N % 8 == 0,| int_mm_inline    |
|        |        | compiling                                      |                  |
| cuda   | W4A8   | _int_mm supported, M > 16, K % 8 == N % 8 == 0 | int_mm           |
| cuda   | W4A8   | K <= 16384 (few rows, older GPU, odd shapes)   | int8pack_exact   |
| cuda   | W4A8   | otherwise                                      | fp32_exact       |
| other  | W4A16  | any (Apple's mps, Intel's xpu, …)              | dequant          |
| other  | W4A8   | any                                            | fp32_exact       |

The opt-in W4A8 weight cache (:func:`weight_cache_backend`) is oneDNN's prepacked
int8 layout on ``amx-int8``, where oneDNN's int8 GEMM runs on AMX tiles and beats
both ``_int_mm`` (VNNI) and the bf16 GEMM; on the other classes it is the plain
unpacked int8 weight for ``int_mm_chunked`` (where mgtq's VNNI kernel is built, that kernel
runs instead and the cache is not read).  Without AMX, oneDNN's int8 linear is orders of
magnitude slower than ``_int_mm`` (on a real ``avx512-vnni`` CPU, and on an AMX one with oneDNN
capped at VNNI), so ``avx512-vnni`` never takes the oneDNN path.

Kernels:

* ``int8pack``: ``torch._weight_int8pack_mm`` on the unpacked int4 weight
  (read once, no float weight);
* ``dequant``: dequantize to the activation dtype (cache-blocked on CPU, one
  fused kernel on CUDA) + ``F.linear``;
* ``dequant_inline``: the same dequantization as plain torch ops, so that
  Inductor fuses unpack, convert, scale and cast into one pass (an opaque
  custom op would make it run the unfused eager code);
* ``dequant_fp32``: dequantize to fp32 + fp32 GEMM, the output cast back to
  the activation dtype: on ``avx2`` CPUs oneDNN emulates bf16 / fp16 GEMMs
  (no such dot products), several times slower than its fp32 GEMM; on ``generic`` CPUs
  (aarch64, Apple silicon) the fp32 GEMM is the one every BLAS there is tuned for; more
  accurate than the half-precision GEMM, not bit-equal to it;
* ``tinygemm``: ``torch._weight_int4pack_mm`` on its tiled layout, made by
  the opt-in :func:`prepare_tinygemm`;
* ``onednn``: ``onednn.qlinear_pointwise`` on the opt-in prepacked int8
  weight, rescale / bias / cast fused;
* ``onednn_inline``: the same GEMM op under ``torch.compile``, with the
  activation quantization as plain torch ops for Inductor to fuse into its
  producer (the GEMM is a custom op, so the opaque prepacked weight enters
  the graph as an argument; no ``freezing`` needed);
* ``amx`` (W4A8): mgtq's own AMX int8 GEMM (:mod:`mgtq.native.amx`): the int4 weight unpacked
  into AMX tiles per call, the rescale / bias / cast of one 32-column pair overlapped with the
  next pair's tiles; bit-equal to
  ``int_mm_chunked``, no weight cache. Eager and compiled alike: the activation
  quantization stays mgtq's one-pass op (:func:`mgtq.native.amx.quantize_int8`), which
  Inductor's inline version was slower than (measured after a norm and modulation);
* ``amx`` (W4A16): mgtq's own AMX bf16 GEMM: the int4 weight dequantized into
  AMX tiles per call (the same bf16 weights as ``dequant``), fp32 sums, bias and
  cast overlapped as in W4A8; eager and compiled alike (it quantizes nothing for Inductor to fuse);
* ``vnni`` (W4A8): mgtq's own AVX512-VNNI int8 GEMM (``vpdpbusd``) for CPUs without AMX,
  on the AMX kernel's unpacked weight rows (their 4-inputs-of-16-columns rows are
  ``vpdpbusd``'s operand), rescale / bias / GELU / cast in its epilogue; bit-equal to
  ``int_mm_chunked``, eager and compiled, with the one-pass quantizer op. Against
  ``int_mm_chunked`` it saves the int32 accumulator's round trip, the epilogue's
  passes and a separate GELU (``benchmarks/results/linear_kernels_avx512-vnni_meissonic-1024_1thread.md``);
* ``avx512`` (W4A16): mgtq's own AVX512-BF16 bf16 GEMM (``vdpbf16ps``) for CPUs without AMX, on the
  AMX kernel's dequantized chunks (the same bf16 weights as ``dequant``), in the VNNI kernel's register
  block, bias / GELU / cast in its epilogue; eager and compiled. The dequantized weight stays in cache,
  where ``dequant`` writes it whole before oneDNN's GEMM reads it back;
* ``int8pack_exact``: int8 activations (as fp32) x int4 weights through
  ``torch._weight_int8pack_mm`` with unit scales, then the W4A8 rescale;
* ``int_mm_chunked``: ``torch._int_mm`` per 256 output columns, the int32
  epilogue read from cache;
* ``int_mm_chunked_inline``: the same GEMM op, with the activation quantization
  as plain torch ops that Inductor fuses into the norm / modulation / GELU
  producing the input (one pass fewer over the activations per layer);
* ``int_mm``: quantize, ONE ``torch._int_mm`` on the whole layer, rescale
  epilogue (each one fused kernel on CUDA);
* ``int_mm_inline``: the same as plain torch ops under ``torch.compile`` on CUDA, so that Inductor fuses the
  activation quantization into its producer, the unpack into one pass and the rescale into the GEMM's consumer
  (the custom ops of ``int_mm`` are opaque to it);
* ``fp32_exact``: devices other than the CPU and CUDA, and ``generic`` CPUs (off x86 torch's CPU ``_int_mm``
  has no oneDNN int8 GEMM to call and runs its reference loops), where neither torch's integer GEMMs nor
  mgtq's kernels are known to run fast: the int8 activations and int4 weights as fp32 through ``torch.matmul``
  (exact integer sums, see :func:`exact_int_sums`), then the W4A8 rescale; plain torch ops only, so it runs wherever torch
  does, bit-equal to the integer GEMMs where the device's fp32 matmul is IEEE fp32.

``_int_mm`` supported: sm80+, or sm70 / sm75 with CUDA >= 12.3
(:func:`int_mm_supported`); otherwise, and for M <= 16 (``_int_mm``'s CUDA
minimum), ``int8pack_exact`` runs without padding or weight copies, where K keeps its fp32 sums exact
(``EXACT_FP32_MAX_K``; Meissonic's largest K is 4096), and ``fp32_exact`` (which sums longer rows in pieces) beyond.

Why these (``benchmarks/bench_linear_kernels.py`` times every candidate per layer shape):

* CPU many rows: oneDNN runs the bf16 GEMM on AMX straight from the plain
  weight, while ``torch._int_mm`` runs on AVX512-VNNI; ``_weight_int4pack_mm_for_cpu``
  and ``_weight_int8pack_mm`` are GEMV-style kernels, an order of magnitude
  slower at M in the thousands.  Hence dequantize + bf16 GEMM for W4A16, and
  a column-chunked ``_int_mm`` (its int32 accumulator stays in cache) for W4A8.
* AMX-int8 CPUs: none of torch's kernels reads int4 weights into AMX tiles, so
  mgtq's own (:mod:`mgtq.native.amx`) do, for every row count: per layer at Meissonic-1024
  shapes they beat the chunked ``_int_mm`` and dequantize + bf16 GEMM, at a full forward's rows and at a
  local step's (``benchmarks/results/linear_kernels_amx_meissonic-1024_1thread.md``, ``..._98rows_1thread.md``).
  The oneDNN cache keeps its row: a user who made it chose it.
* AVX512-BF16 CPUs without AMX (AMD Zen 4): mgtq's ``avx512`` W4A16 beats dequantize + oneDNN's GEMM at
  those shapes (``benchmarks/results/linear_kernels_avx512-vnni_meissonic-1024_1thread.md``); at 2 rows
  (adaLN) ``int8pack`` is at least as fast, so few per-channel rows keep ``int8pack``.
* Few rows (adaLN, embedders: M = batch): the weight is read once, so reading
  it as int8 beats materialising a float weight; for W4A8 on CPU one
  ``_int_mm`` on the whole layer (chunking only pays for large accumulators).
* ``int8pack_exact``: int8 activations are integers below 2**8 and int4 weights
  below 2**3, so with fp32 accumulation every partial sum is an exact integer
  as long as ``K <= 2**24 / (128 * 8) = 16384`` -- the same result as the int32
  GEMM (then one fp32 rescale), without ``_int_mm``'s M > 16 limit on CUDA.
* CUDA: every elementwise step (activation quantization, int4 unpack,
  int32 rescale + bias + cast, dequantize) is one fused kernel (a
  ``torch.compile``-d pointwise function, Triton), registered as a custom op
  so the model itself compiles with ``fullgraph=True`` on every device; under a
  whole-model ``torch.compile`` the ``*_inline`` kernels give those steps to Inductor instead.
* ``tinygemm`` needs its own tiled copy of the weight (int4, the same bytes
  again), so it is opt-in; the state dict keeps ``weight_packed``.

The fused ops are ``torch.library`` custom ops (``mgtq::...``): opaque to
Dynamo (no graph breaks), one op in a ``TorchDispatchMode`` op count, and on
CPU their implementation is the cache-blocked eager code of :mod:`.qtensor`.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mgtq.compilation import note_toolchain_failure, toolchain_failure
from mgtq.fused import apply_activation, check_activation, float_linear

from mgtq.native import amx
from mgtq.native.cpu import CPU_CLASS_ENV, CPU_CLASSES, cpu_class, cpu_isa, cpu_model, detect_cpu_class
from .packing import unpack_int4, unpack_int4_times16
from .qtensor import (
    INT8_MAX,
    INT8_MIN,
    INT8_MM_CHUNK_N,
    SMALL_M,
    dequantize_int4_weight,
    int8_int4_linear,
    onednn_int8_linear,
    quantize_int8_per_tensor,
)

__all__ = [
    "KERNELS",
    "CPU_CLASSES",
    "KernelContext",
    "choose_kernel",
    "cpu_class",
    "describe_kernels",
    "kernels_label",
    "native_available",
    "weight_cache_backend",
    "int_mm_supported",
    "w4a16_linear",
    "w4a8_linear",
    "prepare_tinygemm",
    "TINYGEMM_GROUP_SIZES",
]

KERNELS = ("int8pack", "dequant", "dequant_inline", "dequant_fp32", "tinygemm", "onednn", "onednn_inline",
           "amx", "vnni", "avx512", "int8pack_exact", "int_mm_chunked", "int_mm_chunked_inline", "int_mm",
           "int_mm_inline", "fp32_exact")
# Classes where the W4A8 weight cache is oneDNN's prepacked weight and its GEMM the fastest W4A8
# path (AMX int8 tiles; see the module docstring for why not avx512-vnni).
ONEDNN_INT8_CLASSES = ("amx-int8",)
# Classes whose W4A8 runs mgtq's AVX512-VNNI kernel (mgtq.native.amx.w4a8_vnni_linear) where it is built, and
# whose W4A16 runs its AVX512-BF16 kernel (w4a16_avx512_linear) where the CPU has AVX512-BF16.
VNNI_NATIVE_CLASSES = ("amx-bf16", "avx512-vnni")
# torch._weight_int4pack_mm (tinygemm) supports these group sizes; a per-channel
# weight is fed to it as groups of 256 carrying the same scale. tinygemm reads its scales in bf16, so its
# weights are q * bf16(scale): within one bf16 step of the dequant path's q * scale (fp32 product, one rounding).
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_INNER_K_TILES = 8
# Devices whose kernels are torch's integer GEMMs or mgtq's; any other (mps, xpu, ...) runs plain torch ops
# (dequant / fp32_exact), which read no int8 weight cache.
INTEGER_KERNEL_DEVICES = ("cpu", "cuda")
# Exactness bound of int8pack_exact and fp32_exact: 2**24 / (|int8| max 128 * |int4| max 8).
EXACT_FP32_MAX_K = 1 << 14


@dataclass(frozen=True)
class KernelContext:
    """What the choice depends on, all known before the call (no tensor data read).

    device: "cpu", "cuda" or another torch device type (mps, xpu, …); capability: CUDA compute capability
    (major, minor) or None; m, k, n: rows, in, out features; dtype: activation dtype;
    group_size: weight group size (== k for per-channel); cache: W4A8 "onednn"
    weight cache present; tinygemm: a prepared tinygemm weight present;
    compiling: inside torch.compile tracing; cpu_class: one of CPU_CLASSES (CPU only);
    native: mgtq's own kernels for ``cpu_class`` (:mod:`mgtq.native.amx`) built and allowed to run on this
    machine (:func:`native_available`: the AMX ones on ``amx-int8``, the AVX512-VNNI one elsewhere);
    avx512_bf16: the CPU also has AVX512-BF16 dot products for them (:func:`mgtq.native.amx.avx512_bf16_available`).
    """

    device: str
    m: int
    k: int
    n: int
    dtype: torch.dtype
    group_size: int
    capability: tuple[int, int] | None = None
    cache: bool = False
    tinygemm: bool = False
    compiling: bool = False
    cpu_class: str | None = None
    native: bool = False
    avx512_bf16: bool = False

    def __post_init__(self):
        if self.cpu_class is not None and self.cpu_class not in CPU_CLASSES:
            raise ValueError(f"cpu_class must be one of {CPU_CLASSES}, got {self.cpu_class!r}")


def weight_cache_backend(cls: str) -> str:
    """The W4A8 weight cache for CPU class ``cls``: ``"onednn"`` with int8 dot products, else ``"int8"``."""
    return "onednn" if cls in ONEDNN_INT8_CLASSES else "int8"


def int_mm_supported(capability: tuple[int, int] | None, cuda_version: str | None) -> bool:
    """Whether ``torch._int_mm`` with a (K, N) column-major weight runs on this CUDA GPU.

    cuBLASLt's int8 IMMA path needs sm80+; on sm70/sm75 PyTorch enables it
    only when built against CUDA >= 12.3.
    """
    if capability is None:
        return False
    if capability >= (8, 0):
        return True
    if capability in ((7, 0), (7, 5)) and cuda_version:
        major, minor = (int(p) for p in cuda_version.split(".")[:2])
        return (major, minor) >= (12, 3)
    return False


def choose_kernel(scheme: str, ctx: KernelContext) -> str:
    """The kernel name (see the module table) for ``scheme`` "w4a16" or "w4a8" in context ``ctx``."""
    per_channel = ctx.group_size == ctx.k
    small = ctx.m <= SMALL_M
    if scheme not in ("w4a16", "w4a8"):
        raise ValueError(f"scheme must be 'w4a16' or 'w4a8', got {scheme!r}")
    if ctx.device not in INTEGER_KERNEL_DEVICES:
        # mgtq's kernels read host memory, and torch's integer GEMMs are not known to run there: plain torch ops.
        return "dequant" if scheme == "w4a16" else "fp32_exact"
    if scheme == "w4a16":
        if (ctx.device == "cpu" and ctx.cpu_class == "amx-int8" and ctx.native
                and amx.supports_w4a16(ctx.k, ctx.n, ctx.group_size, ctx.dtype)):
            return "amx"
        if (ctx.device == "cuda" and ctx.tinygemm and ctx.dtype == torch.bfloat16
                and ctx.capability is not None and ctx.capability >= (8, 0)):
            return "tinygemm"
        if small and per_channel and (ctx.device == "cuda" or ctx.k % 32 == 0):
            return "int8pack"
        if (ctx.device == "cpu" and ctx.cpu_class in VNNI_NATIVE_CLASSES and ctx.native and ctx.avx512_bf16
                and amx.supports_w4a16_avx512(ctx.k, ctx.n, ctx.group_size, ctx.dtype)):
            return "avx512"  # after int8pack: its dequantized chunks cost more than int8pack's GEMV at few rows
        half = ctx.dtype in (torch.bfloat16, torch.float16)
        if ctx.device == "cpu" and ctx.cpu_class in ("avx2", "generic") and half:
            return "dequant_fp32"  # avx2: no bf16/fp16 dot products, oneDNN emulates them; generic: see the docstring
        return "dequant_inline" if ctx.compiling else "dequant"
    if scheme == "w4a8":
        # The cache is built for this machine's class (weight_cache_backend); a context without a class
        # (tests of other rows) trusts it.
        if ctx.device == "cpu" and ctx.cache and ctx.cpu_class in (None, *ONEDNN_INT8_CLASSES):
            return "onednn_inline" if ctx.compiling and not ctx.native else "onednn"  # native: see "amx"
        if ctx.device == "cpu" and ctx.cpu_class == "amx-int8" and ctx.native and amx.supports(ctx.k, ctx.n, ctx.dtype):
            return "amx"
        if (ctx.device == "cpu" and ctx.cpu_class in VNNI_NATIVE_CLASSES and ctx.native
                and amx.supports_vnni(ctx.k, ctx.n, ctx.dtype)):
            return "vnni"
        if ctx.device == "cpu" and ctx.cpu_class == "generic":
            return "fp32_exact"  # the exact integer sums through the fp32 GEMM (see the docstring)
        if ctx.device == "cuda":
            ok = (int_mm_supported(ctx.capability, torch.version.cuda) and ctx.m > 16
                  and ctx.k % 8 == 0 and ctx.n % 8 == 0)
            if ok:
                return "int_mm_inline" if ctx.compiling else "int_mm"
            return "int8pack_exact" if ctx.k <= EXACT_FP32_MAX_K else "fp32_exact"
        # Few rows: the (M, N) accumulator is tiny, so one unchunked _int_mm (no CUDA-style limits on CPU);
        # torch's fp32 _weight_int8pack_mm is unvectorised on CPU, so int8pack_exact is CUDA-only.
        if small:
            return "int_mm"
        return "int_mm_chunked_inline" if ctx.compiling else "int_mm_chunked"


@torch.compiler.assume_constant_result
def _cuda_capability(index: int) -> tuple[int, int]:
    return _cached_capability(index)


@functools.lru_cache(maxsize=None)
def _cached_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def context_for(x: torch.Tensor, k: int, n: int, group_size: int, cache: bool = False,
                tinygemm: bool = False, force_device: str | None = None) -> KernelContext:
    """The :class:`KernelContext` of a call on ``x (..., K)``; ``force_device`` is for tests."""
    device = force_device or x.device.type
    capability = None
    if device == "cuda":
        capability = (8, 0) if x.device.type != "cuda" else _cuda_capability(x.device.index or 0)
    return KernelContext(device=device, m=x.numel() // max(k, 1), k=k, n=n, dtype=x.dtype,
                         group_size=group_size, capability=capability, cache=cache, tinygemm=tinygemm,
                         compiling=torch.compiler.is_compiling(), cpu_class=cpu_class() if device == "cpu" else None,
                         native=device == "cpu" and x.device.type == "cpu" and native_available(cpu_class()),
                         avx512_bf16=device == "cpu" and x.device.type == "cpu" and amx.avx512_bf16_available())


def native_available(cls: str) -> bool:
    """Whether mgtq's own kernels for CPU class ``cls`` are built and may run on this machine: the AMX ones on
    ``amx-int8``, the AVX512-VNNI ones on the classes of ``VNNI_NATIVE_CLASSES``."""
    if cls == "amx-int8":
        return amx.available()
    return cls in VNNI_NATIVE_CLASSES and amx.vnni_available()


def describe_kernels(device: str | torch.device) -> dict:
    """What decides which kernels run on ``device``, for a result to record beside its figures.

    A quantized model's outputs follow its kernels (int8 and bf16 sums run in each kernel's own order), so
    a score measured with one CPU class's kernels can differ from another's: CPU model, its extensions, the
    class and whether mgtq's kernels for it are built; on CUDA the GPU and its compute capability; on another
    device (mps, xpu, …) its type, as every such device runs the same plain torch ops (``choose_kernel``).
    """
    device = torch.device(device)
    out = {"device": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return out | {"gpu": torch.cuda.get_device_name(index),
                      "capability": list(torch.cuda.get_device_capability(index))}
    if device.type != "cpu":
        return out
    cls = cpu_class()
    return out | {"cpu_model": cpu_model(), "isa": cpu_isa(), "cpu_class": cls, "native": native_available(cls)}


def kernels_label(description: dict) -> str:
    """One line for a report from :func:`describe_kernels`'s dict.

    e.g. "cpu AMD EPYC, class avx512-vnni (mgtq's kernels)", "cuda NVIDIA H200 (sm_90)", "mps (torch's ops)".
    """
    if description["device"] == "cuda":
        major, minor = description["capability"]
        return f"cuda {description['gpu']} (sm_{major}{minor})"
    if description["device"] != "cpu":
        return f"{description['device']} (torch's ops)"
    own = "mgtq's kernels" if description["native"] else "torch's kernels only"
    return f"cpu {description['cpu_model'] or 'unknown model'}, class {description['cpu_class']} ({own})"


# ------------------------------------------------------------------ fused elementwise kernels
# Each is written once as plain torch code (the reference), run eagerly on CPU
# (or through the cache-blocked qtensor version) and compiled into one fused
# kernel on CUDA.

def _quantize_rows_ref(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) float -> int8 (M, K): ``clamp(round(x_fp32 * inv_scale), -128, 127)``."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return torch.clamp(torch.round(x2 * inv_scale), INT8_MIN, INT8_MAX).to(torch.int8)


def _rescale_ref(acc: torch.Tensor, weight_scale: torch.Tensor | None, input_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, acc_factor: float) -> torch.Tensor:
    """Accumulator (M, N) -> ``acc * (weight_scale * input_scale * acc_factor) + bias`` in out_dtype.

    The column scale is one fp32 product (as in the CPU chunked kernel); a
    missing scale counts as 1 (the accumulator is then already scaled).
    """
    y = acc.to(torch.float32)
    if weight_scale is not None:
        col = weight_scale.reshape(-1).to(torch.float32) * input_scale.to(torch.float32) * acc_factor
        y = y * col
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def _dequantize_ref(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q_times16 = unpack_int4_times16(packed)
    n, k = q_times16.shape
    g = scale.shape[1]
    w = q_times16.to(torch.float32).view(n, g, k // g) * (scale.to(torch.float32) * (1.0 / 16.0)).unsqueeze(-1)
    return w.view(n, k).to(dtype)


# The runner of each fused kernel by name: compiled, or the eager reference where compiling failed.
_COMPILED: dict[str, object] = {}
# (name, argument signature) pairs past Dynamo's recompile limit: those run the reference.
_PAST_LIMIT: set[tuple] = set()


def _fused(name: str, fn):
    """``fn`` compiled into one CUDA kernel; ``fn`` itself, with one warning, where compiling fails (no Triton,
    no C compiler, a GPU Triton does not support): the eager reference gives the same results."""
    return functools.partial(_run_fused, name, fn)


def _signature(arg) -> object:
    """What a compiled graph specializes on: a tensor's device, dtype and rank; any other argument's value."""
    return (arg.device, arg.dtype, arg.dim()) if isinstance(arg, torch.Tensor) else arg


def _key(name: str, args: tuple) -> tuple:
    return (name, *map(_signature, args))


def _run_fused(name: str, fn, *args):
    """``name``'s runner on ``args``. torch.compile is lazy, so a backend that cannot compile fails when a graph is
    first made, on any call that brings a new signature, not only the first: such a failure hands the kernel to
    its reference for good. Dynamo counts graphs per function and, under ``fullgraph=True``, raises past its
    recompile limit (bias or none, model dtype, device index, … multiply them); that signature alone then runs
    the reference, and the signatures compiled before keep their graphs."""
    runner = _COMPILED.get(name)
    if runner is None:
        runner = _COMPILED[name] = fn if toolchain_failure() else _compiled_or_eager(name, fn)
    if runner is fn or (_PAST_LIMIT and _key(name, args) in _PAST_LIMIT):  # the key only once any is past it
        return fn(*args)
    try:
        return runner(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:  # not a TorchDynamoException
        warnings.warn(f"mgtq: the fused {name!r} kernel reached torch._dynamo.config.recompile_limit "
                      f"({torch._dynamo.config.recompile_limit} argument signatures in this process); calls with "
                      "new signatures run its eager reference: same results, slower", RuntimeWarning, stacklevel=3)
        _PAST_LIMIT.add(_key(name, args))
    except torch._dynamo.exc.TorchDynamoException as err:
        if not note_toolchain_failure(err):  # no compiler or Triton at all is said once, for every kernel
            _fallback_warning(name, err)
        _COMPILED[name] = fn
    return fn(*args)


def _compiled_or_eager(name: str, fn):
    """``fn`` compiled, or ``fn`` with a warning where torch.compile refuses at once (a Python Dynamo does not
    support)."""
    try:
        return torch.compile(fn, dynamic=True, fullgraph=True)
    except Exception as err:  # noqa: BLE001 (any refusal: the eager reference is right everywhere)
        _fallback_warning(name, err)
        return fn


def _fallback_warning(name: str, err: Exception) -> None:
    warnings.warn(f"mgtq: compiling the fused {name!r} kernel failed ({(str(err).splitlines() or [''])[0][:200]}); "
                  "its eager reference runs instead: same results, slower", RuntimeWarning, stacklevel=3)


def _native_quantizer(x: torch.Tensor) -> bool:
    """Whether mgtq's one-pass CPU quantizer takes `x`: it reads `x`'s memory from the host, so a CPU tensor only."""
    return x.device.type == "cpu" and amx.vnni_available() and x.dtype in (torch.bfloat16, torch.float32)


@torch.library.custom_op("mgtq::quantize_int8_rows", mutates_args=())
def quantize_int8_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) float, static scale () -> int8 (M, K), round-half-even of ``x_fp32 * (1/scale)``."""
    if x.device.type != "cpu":
        inv = torch.reciprocal(scale.to(torch.float32))  # IEEE reciprocal, as on CPU
        # The CPU's cache-blocked version suits no other device: one fused kernel on CUDA, plain ops elsewhere.
        return _fused("quantize", _quantize_rows_ref)(x, inv) if x.device.type == "cuda" else _quantize_rows_ref(x, inv)
    if _native_quantizer(x):
        return amx.quantize_int8(x, scale)  # one vectorised pass instead of four cache-blocked torch ops
    return quantize_int8_per_tensor(x, scale).reshape(-1, x.shape[-1])


@quantize_int8_rows.register_fake
def _(x, scale):
    return x.new_empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=torch.int8)


@torch.library.custom_op("mgtq::unpack_int4_times16", mutates_args=())
def unpack_int4_times16_op(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> int8 (N, K) holding ``16 * q`` (see :func:`.packing.unpack_int4_times16`)."""
    if packed.device.type == "cuda":
        return _fused("unpack_times16", unpack_int4_times16)(packed)
    return unpack_int4_times16(packed)


@unpack_int4_times16_op.register_fake
def _(packed):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.int8)


@torch.library.custom_op("mgtq::unpack_int4", mutates_args=())
def unpack_int4_op(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> int8 (N, K) holding ``q`` in [-8, 7]."""
    if packed.device.type == "cuda":
        return _fused("unpack", unpack_int4)(packed)
    return unpack_int4(packed)


@unpack_int4_op.register_fake
def _(packed):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.int8)


@torch.library.custom_op("mgtq::rescale_acc", mutates_args=())
def rescale_acc(acc: torch.Tensor, weight_scale: torch.Tensor | None, input_scale: torch.Tensor | None,
                bias: torch.Tensor | None, out_dtype: torch.dtype, acc_factor: float) -> torch.Tensor:
    """Epilogue of an integer GEMM: (M, N) accumulator -> rescaled, biased (M, N) in ``out_dtype``."""
    if acc.device.type == "cuda":
        y = _fused("rescale", _rescale_ref)(acc, weight_scale, input_scale, bias, out_dtype, acc_factor)
    else:
        y = _rescale_ref(acc, weight_scale, input_scale, bias, out_dtype, acc_factor)
    return y.clone() if y is acc else y  # a custom op may not return its input


@rescale_acc.register_fake
def _(acc, weight_scale, input_scale, bias, out_dtype, acc_factor):
    return acc.new_empty(acc.shape, dtype=out_dtype)


@torch.library.custom_op("mgtq::dequantize_int4", mutates_args=())
def dequantize_int4_op(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed int4 (N, K/2) + scales (N, G) -> float (N, K) in ``dtype`` (exact fp32 product, one rounding)."""
    if packed.device.type == "cuda":
        return _fused("dequantize", _dequantize_ref)(packed, scale, dtype)
    if packed.device.type != "cpu":  # the CPU's cache-blocked loop would be many small launches on mps / xpu
        return _dequantize_ref(packed, scale, dtype)
    return dequantize_int4_weight(packed, scale, dtype)


@dequantize_int4_op.register_fake
def _(packed, scale, dtype):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


@torch.library.custom_op("mgtq::int8_int4_linear_chunked", mutates_args=())
def int8_int4_linear_chunked(x_q: torch.Tensor, packed: torch.Tensor, col_scale: torch.Tensor,
                             bias: torch.Tensor | None, out_dtype: torch.dtype, chunk_n: int,
                             weight_times16: torch.Tensor | None = None) -> torch.Tensor:
    """CPU W4A8 GEMM, chunked over output columns (see :func:`.qtensor.int8_int4_linear`)."""
    return int8_int4_linear(x_q, packed, col_scale, bias, out_dtype, chunk_n=chunk_n, weight_times16=weight_times16)


@int8_int4_linear_chunked.register_fake
def _(x_q, packed, col_scale, bias, out_dtype, chunk_n, weight_times16=None):
    return x_q.new_empty((x_q.shape[0], packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("mgtq::weight_int8pack_mm", mutates_args=())
def weight_int8pack_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``torch._weight_int8pack_mm`` (x (M, K) float, weight int8 (N, K), scales (N,)) kept opaque to
    Inductor, whose CPU lowering of it fails on torch 2.13; eager and aot_eager see the aten op."""
    return torch._weight_int8pack_mm(x, weight, scales)


@weight_int8pack_mm.register_fake
def _(x, weight, scales):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("mgtq::onednn_int8_linear", mutates_args=())
def onednn_int8_linear_op(x_q: torch.Tensor, input_scale: torch.Tensor, prepacked: torch.Tensor,
                          weight_scale: torch.Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype, activation: str = "") -> torch.Tensor:
    """:func:`.qtensor.onednn_int8_linear` as one op: Inductor lowers a bare ``qlinear_pointwise`` only
    when its prepacked weight is a frozen constant (``freezing``); an opaque op takes it as an argument.
    ``activation``: a :data:`mgtq.fused.ACTIVATIONS` name fused into the epilogue, "" for none."""
    return onednn_int8_linear(x_q, input_scale, prepacked, weight_scale, bias, out_dtype, activation or None)


@onednn_int8_linear_op.register_fake
def _(x_q, input_scale, prepacked, weight_scale, bias, out_dtype, activation=""):
    return x_q.new_empty((x_q.shape[0], weight_scale.shape[0]), dtype=out_dtype)


@torch.library.custom_op("mgtq::w4a8_cpu", mutates_args=())
def w4a8_cpu_op(x_q: torch.Tensor, packed: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype, activation: str = "", tiles: bool = True) -> torch.Tensor:
    """:func:`mgtq.native.amx.w4a8_linear` (``tiles``) or :func:`~mgtq.native.amx.w4a8_vnni_linear` (the same
    sums on AVX512-VNNI) as one op (opaque to Inductor, like the other GEMM ops here)."""
    fn = amx.w4a8_linear if tiles else amx.w4a8_vnni_linear
    return fn(x_q, packed, col_scale, bias, out_dtype, activation or None)


@w4a8_cpu_op.register_fake
def _(x_q, packed, col_scale, bias, out_dtype, activation="", tiles=True):
    return x_q.new_empty((x_q.shape[0], packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("mgtq::w4a16_cpu", mutates_args=())
def w4a16_cpu_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 activation: str = "", tiles: bool = True) -> torch.Tensor:
    """:func:`mgtq.native.amx.w4a16_linear` (``tiles``) or :func:`~mgtq.native.amx.w4a16_avx512_linear` as one op."""
    fn = amx.w4a16_linear if tiles else amx.w4a16_avx512_linear
    return fn(x, packed, scale, bias, activation or None)


@w4a16_cpu_op.register_fake
def _(x, packed, scale, bias, activation="", tiles=True):
    return x.new_empty((x.shape[0], packed.shape[0]))


# ------------------------------------------------------------------------------ the two layers
def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 tinygemm: tuple[torch.Tensor, torch.Tensor] | None = None,
                 force_device: str | None = None, activation: str | None = None) -> torch.Tensor:
    """W4A16: float ``x (..., K)`` times packed int4 ``(N, K/2)`` with scales ``(N, G)`` (+ bias).

    ``tinygemm``: the prepared ``(weight, scales_and_zeros)`` of :func:`prepare_tinygemm`, if any.
    ``force_device`` runs another device's choice (tests check the CUDA path on CPU).
    ``activation`` (a :data:`mgtq.fused.ACTIVATIONS` name): applied to the output; fused
    into the GEMM epilogue where the dequantized weight goes through
    :func:`~mgtq.fused.float_linear` (bf16 on CPU).
    """
    check_activation(activation)
    n, k = packed.shape[0], packed.shape[1] * 2
    ctx = context_for(x, k, n, k // scale.shape[1], tinygemm=tinygemm is not None, force_device=force_device)
    kernel = choose_kernel("w4a16", ctx)
    if kernel in ("amx", "avx512"):
        # The bias in the activation dtype first, as the dequant path gives it to the GEMM.
        y = w4a16_cpu_op(x.reshape(-1, k), packed, scale, None if bias is None else bias.to(x.dtype), activation or "",
                         kernel == "amx")
        return y.reshape(*x.shape[:-1], n)  # the activation applied in the kernel's epilogue
    if kernel == "tinygemm":
        weight, scales_zeros = tinygemm
        x2 = x.reshape(-1, k).contiguous()  # the CUDA kernel refuses a strided A
        y = torch._weight_int4pack_mm(x2, weight, k // scales_zeros.shape[0], scales_zeros)
        y = y if bias is None else y + bias.to(y.dtype)
        return apply_activation(y.reshape(*x.shape[:-1], n), activation)
    if kernel == "int8pack":
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        # The CPU kernel needs the scales in x's dtype (bf16: rounded once more, within bf16 noise); the CUDA one
        # converts them to fp32 itself (aten/src/ATen/native/cuda/int8mm.cu), so there they keep their precision.
        scales = scale.reshape(-1) if x.device.type == "cuda" else scale.reshape(-1).to(x.dtype)
        y = weight_int8pack_mm(x2, unpack_int4_op(packed), scales)
        y = y if bias is None else y + bias.to(y.dtype)
        return apply_activation(y.reshape(*x.shape[:-1], n), activation)
    if kernel == "dequant_fp32":
        # Plain torch ops: eager runs them as they are, Inductor fuses the dequantization.
        w = _dequantize_ref(packed, scale, torch.float32)
        y = F.linear(x.float(), w, None if bias is None else bias.float())
        return apply_activation(y, activation).to(x.dtype)
    if kernel == "dequant_inline":
        w = _dequantize_ref(packed, scale, x.dtype)
    else:
        w = dequantize_int4_op(packed, scale, x.dtype)
    return float_linear(x, w, None if bias is None else bias.to(x.dtype), activation)


def w4a8_linear(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                bias: torch.Tensor | None, onednn_weight: torch.Tensor | None = None,
                weight_times16: torch.Tensor | None = None, chunk_n: int = INT8_MM_CHUNK_N,
                force_device: str | None = None, activation: str | None = None) -> torch.Tensor:
    """W4A8: ``x (..., K)`` quantized to int8 with ``input_scale ()``, times int4 ``(N, K/2)``, scales ``(N, 1)``.

    ``onednn_weight`` / ``weight_times16``: the opt-in int8 weight caches of
    :class:`~mgtq.quantization.qlinear.W4A8Linear` (``weight_times16`` is used by
    the chunked CPU kernel and by ``int_mm`` in place of unpacking). ``activation``: applied to the
    output, in oneDNN's epilogue (on the fp32 result, before the cast) with the oneDNN weight cache.
    """
    check_activation(activation)
    n, k = packed.shape[0], packed.shape[1] * 2
    ctx = context_for(x, k, n, k, cache=onednn_weight is not None, force_device=force_device)
    kernel = choose_kernel("w4a8", ctx)
    if kernel in ("int_mm_chunked_inline", "onednn_inline", "int_mm_inline"):
        # IEEE reciprocal then one fp32 product and round-half-even: the eager kernel's exact rounding.
        x_q = _quantize_rows_ref(x, torch.reciprocal(input_scale.to(torch.float32)))
    else:
        x_q = quantize_int8_rows(x, input_scale)  # (M, K)
    if kernel == "int_mm":
        q_times16 = unpack_int4_times16_op(packed) if weight_times16 is None else weight_times16
        acc = torch._int_mm(x_q, q_times16.t())  # 16 * exact int32, (M, N)
        y = rescale_acc(acc, weight_scale, input_scale, bias, x.dtype, 1.0 / 16.0)
    elif kernel == "int_mm_inline":  # the same ops, visible to Inductor
        q_times16 = unpack_int4_times16(packed) if weight_times16 is None else weight_times16
        acc = torch._int_mm(x_q, q_times16.t())
        y = _rescale_ref(acc, weight_scale, input_scale, bias, x.dtype, 1.0 / 16.0)
    elif kernel == "int8pack_exact":
        # Unit scales: the kernel returns the exact integer sums (fp32 holds them exactly for
        # K <= EXACT_FP32_MAX_K), rescaled once below exactly like the int32 GEMM's accumulator.
        ones = torch.ones(n, dtype=torch.float32, device=x.device)
        acc = weight_int8pack_mm(x_q.to(torch.float32), unpack_int4_op(packed), ones)
        y = rescale_acc(acc, weight_scale, input_scale, bias, x.dtype, 1.0)
    elif kernel == "fp32_exact":
        y = rescale_acc(exact_int_sums(x_q, unpack_int4_op(packed)), weight_scale, input_scale, bias, x.dtype, 1.0)
    elif kernel in ("amx", "vnni"):
        y = w4a8_cpu_op(x_q, packed, weight_scale[:, 0] * input_scale, bias, x.dtype, activation or "",
                        kernel == "amx")
        activation = None  # applied in the kernel's epilogue
    elif kernel in ("onednn", "onednn_inline"):
        y = onednn_int8_linear_op(x_q, input_scale, onednn_weight, weight_scale[:, 0], bias, x.dtype, activation or "")
        activation = None  # applied in oneDNN's epilogue
    else:
        y = int8_int4_linear_chunked(x_q, packed, weight_scale[:, 0] * input_scale, bias, x.dtype, chunk_n,
                                     weight_times16)
    return apply_activation(y.reshape(*x.shape[:-1], n), activation)


def exact_int_sums(x_q: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """int8 ``x_q (M, K)`` times int4 values ``q (N, K)`` (int8 holding [-8, 7]) -> the exact int32 sums ``(M, N)``,
    through fp32 matmuls: every partial sum over at most EXACT_FP32_MAX_K products is at most 2**24 in magnitude,
    which fp32 holds exactly in any order of addition; longer rows go in such pieces, added in int32 (exact for
    K <= 2**21, int32's range). Written for correctness on any device: it makes an fp32 copy of the weight per call."""
    acc = torch.zeros(x_q.shape[0], q.shape[0], dtype=torch.int32, device=x_q.device)
    for k0 in range(0, x_q.shape[1], EXACT_FP32_MAX_K):
        piece = slice(k0, k0 + EXACT_FP32_MAX_K)
        part = torch.matmul(x_q[:, piece].to(torch.float32), q[:, piece].to(torch.float32).t()).to(torch.int32)
        acc.add_(part)
    return acc


# ------------------------------------------------------------------------------------ tinygemm
def tinygemm_operands(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Device-independent part of the tinygemm conversion: (uint4 codes (N, K) int32, scales_and_zeros, group).

    tinygemm dequantizes ``(u - 8) * scale + zero`` from unsigned 4-bit ``u``;
    mgtq's symmetric ``q`` maps onto it exactly as ``u = q + 8``, zero 0.
    Scales and zeros: bf16 ``(K / group, N, 2)``; a per-channel weight becomes
    groups of 256 (or the largest supported group dividing K) repeating its scale.
    """
    k = packed.shape[1] * 2
    groups = scale.shape[1]
    group = k // groups
    if groups == 1:
        group = next((g for g in reversed(TINYGEMM_GROUP_SIZES) if k % g == 0), None)
        if group is None:
            raise ValueError(f"tinygemm needs K divisible by 32, got K={k}")
    elif group not in TINYGEMM_GROUP_SIZES:
        raise ValueError(f"tinygemm supports group sizes {TINYGEMM_GROUP_SIZES}, got {group}")
    codes = unpack_int4(packed).to(torch.int32) + 8  # (N, K) in [0, 15]
    per_group = scale.to(torch.float32).repeat_interleave((k // group) // groups, dim=1)  # (N, K/group)
    scales_zeros = torch.stack([per_group, torch.zeros_like(per_group)], dim=-1)  # (N, K/group, 2)
    return codes, scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16), group


def prepare_tinygemm(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's tiled int4 weight + scales for a CUDA packed weight (a second copy: opt-in).

    Needs N % 8 == 0 and K % (16 * inner k tiles) == 0 (PyTorch's
    ``_convert_weight_to_int4pack``); raises ValueError otherwise.
    """
    if packed.device.type == "meta":  # accelerate's sequential offload keeps the weights off the module
        raise ValueError("tinygemm needs the weights on the GPU, and sequential CPU offload keeps them elsewhere: "
                         "prepare it before enabling offload (its copy then stays on the GPU), or run without it")
    if packed.device.type != "cuda":
        raise ValueError("tinygemm (torch._weight_int4pack_mm) runs on CUDA only; move the model to a GPU first")
    n, k = packed.shape[0], packed.shape[1] * 2
    if n % 8 or k % (16 * TINYGEMM_INNER_K_TILES):
        raise ValueError(f"tinygemm needs N % 8 == 0 and K % {16 * TINYGEMM_INNER_K_TILES} == 0, got N={n}, K={k}")
    codes, scales_zeros, _ = tinygemm_operands(packed, scale)
    # _convert_weight_to_int4pack takes uint8 (N, K/2): element 2j in the high nibble, 2j+1 in the low one.
    interleaved = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    weight = torch._convert_weight_to_int4pack(interleaved, TINYGEMM_INNER_K_TILES)
    return weight, scales_zeros
