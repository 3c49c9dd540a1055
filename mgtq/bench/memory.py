"""Memory accounting: bytes of weights really held, and peak process memory.

Weights: mgtq modules are counted by `model_weight_nbytes` (packed int4 + scales for quantized
layers); for anything else (peers' tensor subclasses) `storage_nbytes` sums the plain tensors a
subclass is made of (`__tensor_flatten__`), so an int4 weight stored one value per byte counts one
byte per value, as it really does.

Peak memory on CPU is the process's peak resident set (VmHWM on Linux, the peak working set on Windows,
ru_maxrss elsewhere; None where none can be had). It can be reset (`reset_peak_rss`, Linux ≥ 4.0) so that a
phase's own peak can be read. On CUDA:
`torch.cuda.max_memory_reserved` / `max_memory_allocated` (what the paper reports).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
from torch import nn

_WINDOWS = os.name == "nt"


def storage_nbytes(t: torch.Tensor | None) -> int:
    """Bytes a tensor really holds: plain tensors numel·itemsize; subclasses the sum of their parts."""
    if t is None:
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(storage_nbytes(getattr(t, name)) for name in names)
    if isinstance(t, nn.Parameter) and type(t.data) is not torch.Tensor:
        return storage_nbytes(t.data)
    return t.numel() * t.element_size()


def _tensors_of(model: nn.Module):
    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                yield t


def module_storage_nbytes(model: nn.Module) -> int:
    """Sum of `storage_nbytes` over every parameter and buffer (each tensor object counted once)."""
    seen: set[int] = set()
    total = 0
    for t in _tensors_of(model):
        if id(t) not in seen:
            seen.add(id(t))
            total += storage_nbytes(t)
    return total


def transformer_weight_nbytes(model: nn.Module) -> tuple[int, str]:
    """(bytes of the transformer's weights as held, method used).

    Plain and mgtq-quantized models: `model_weight_nbytes(model, linear_only=False)` (packed int4 +
    scales, plus every other parameter and buffer). Models holding tensor subclasses (peers):
    `module_storage_nbytes`, which counts the subclasses' inner tensors.
    """
    from mgtq.quantization import model_weight_nbytes

    if any(type(t) not in (torch.Tensor, nn.Parameter) or (isinstance(t, nn.Parameter) and
                                                          type(t.data) is not torch.Tensor)
           for t in _tensors_of(model)):
        return module_storage_nbytes(model), "storage of tensor-subclass parts (__tensor_flatten__)"
    return model_weight_nbytes(model, linear_only=False), "mgtq.quantization.model_weight_nbytes(linear_only=False)"


# ------------------------------------------------------------------------------------- process
def loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (what else ran while measuring), or None (Windows has none)."""
    getloadavg = getattr(os, "getloadavg", None)
    try:
        return [round(x, 2) for x in getloadavg()] if getloadavg is not None else None
    except OSError:
        return None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int | None:
    """Peak resident set of this process (since start or the last `reset_peak_rss`), or None where the system
    gives none.

    Linux: VmHWM of this process's own address space (unlike ru_maxrss, it never inherits a forked
    parent's peak). Windows (no `resource` module): the peak working set. Elsewhere: ru_maxrss (bytes on
    macOS, KiB on other systems).
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    if _WINDOWS:
        import psutil

        return getattr(psutil.Process().memory_info(), "peak_wset", None)
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def highest(*peaks: int | None) -> int | None:
    """The highest of the peaks that are known (None where none is)."""
    return max((p for p in peaks if p is not None), default=None)


def release_free_heap() -> bool:
    """Return freed heap memory to the OS (glibc `malloc_trim(0)`); False where unavailable.

    Building a model leaves freed small blocks (e.g. a peer's bf16 weights after quantization) in
    the heap, still resident. Trimming once after the build makes the RSS that follows count what
    the pipeline holds rather than the allocator's leftovers.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.malloc_trim(0) is not None)
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux `clear_refs` 5). Returns False where unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Peak RSS per named phase of a run: the peak is reset when a phase starts, read when it ends.

    Where resetting is unsupported, a phase's value is the peak since the process started
    (`supported` is False then).
    """

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.supported = reset_peak_rss()

    @contextmanager
    def phase(self, name: str):
        if self.supported:
            reset_peak_rss()
        try:
            yield
        finally:
            self.peaks[name] = peak_rss_bytes()

    @property
    def overall(self) -> int | None:
        """The highest phase peak (None before any phase ran, or where no peak can be read)."""
        return highest(*self.peaks.values())


def cuda_peaks(device: torch.device) -> dict[str, int]:
    """{"max_memory_reserved", "max_memory_allocated"} in bytes since the last reset on `device`."""
    return {"max_memory_reserved": torch.cuda.max_memory_reserved(device),
            "max_memory_allocated": torch.cuda.max_memory_allocated(device)}
