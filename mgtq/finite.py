"""The NaN/inf check: whether a floating-point tensor is all finite in one aminmax pass (`all_finite`), and
which of a module's tensors is not (`non_finite_tensor`): what a save refuses to write, a load refuses to read
and the sampler refuses to sample from."""

from __future__ import annotations

import torch


def non_finite_tensor(module: torch.nn.Module) -> str | None:
    """The state-dict key of `module`'s first floating-point tensor holding NaN or ±inf (meta ones skipped), or
    None: what a save refuses to write and a load refuses to read."""
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            return key
    return None


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element of the floating-point `tensor` is NaN or ±inf.

    min and max carry any NaN (they propagate it) and any infinity, so one aminmax pass decides; an elementwise
    isfinite().all() writes a bool tensor and reads it again, many times slower on CPU half types (seconds per
    load for a billion-parameter transformer: benchmarks/bench_load.py).
    """
    if tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no aminmax or isfinite kernel on the CPU; float16 holds every value
        return all(all_finite(chunk.to(torch.float16)) for chunk in tensor.reshape(-1).split(1 << 24))
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())
