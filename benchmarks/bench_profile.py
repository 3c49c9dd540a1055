"""Where a forward's time goes (`mgtq bench --profile`): torch.profiler self-time summed by operator category.

Categories (by ATen / custom op name):
    int8 GEMM        torch._int_mm, oneDNN int8 linear, mgtq's W4A8 (AMX / VNNI), quanto/torchao int8 matmuls
    int8-weight GEMM float activations × int8 / int4 weights (_weight_int8pack_mm, int4 tinygemm,
                     mgtq's W4A16 (AMX / AVX512-BF16))
    float GEMM       mm / addmm / bmm / linear / matmul in float
    int4 unpack      bit shifts / masks that unpack packed int4 weights
    int8 quantize    round / clamp of activations to int8
    attention        scaled-dot-product attention kernels (torch's SDPA, mgtq's CPU attention)
    conv             convolutions (embedding, feature compression, logits head)
    copy/cast        copies and dtype conversions (quantize/dequantize traffic lands here)
    other            everything else (norms, RoPE (mgtq's one-pass QK-norm + RoPE op too), elementwise,
                     TomeMGT gathers …)
"""

from __future__ import annotations

from typing import Callable

_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("int8-weight GEMM", ("_weight_int8pack_mm", "_weight_int4pack_mm", "mgtq::w4a16_cpu")),
    ("int8 GEMM", ("_int_mm", "qlinear", "int_mm", "int8_mm", "quantized::", "qgemm", "mgtq::w4a8_cpu")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "mgtq::attention_cpu")),
    ("conv", ("conv",)),
    ("float GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                    "aten::_addmm_activation", "mkldnn_linear", "_linear_pointwise", "mgtq::onednn_linear")),
    ("int4 unpack", ("bitwise_", "__rshift__", "__lshift__", "__and__", "__or__")),
    ("int8 quantize", ("aten::round", "aten::round_", "aten::clamp", "aten::clamp_", "mgtq::quantize_int8_rows")),
    ("copy/cast", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous")),
)
CATEGORIES = tuple(name for name, _ in _RULES) + ("other",)


def categorize(op_name: str) -> str:
    """Category of one profiler event name (see module docstring)."""
    for category, patterns in _RULES:
        if any(op_name == p or op_name.startswith(p + ".") or (not p.startswith("aten::") and p in op_name)
               for p in patterns):
            return category
    return "other"


def split_by_category(events: list[tuple[str, float]]) -> dict[str, float]:
    """{category: seconds} from (op name, self seconds) pairs; every category present (0 if unused)."""
    split = dict.fromkeys(CATEGORIES, 0.0)
    for name, seconds in events:
        split[categorize(name)] += seconds
    return split


def profile_call(fn: Callable[[], object], top: int = 12, device: str = "cpu") -> dict:
    """Profile one call of `fn`: total self time, split by category, and the top operators.

    On a CUDA device the time is the GPU's (each kernel's self device time, under the op that launched it);
    the host's would be launch overhead and waiting. Returns {"unit": "s", "clock": "cpu" | "cuda",
    "total_self_s", "split_s": {category: s}, "split_fraction": {category: 0–1},
    "top_ops": [{"name", "self_s", "calls", "category"}]}. Profiler overhead makes the total a
    bit larger than an unprofiled call; the split is what this is for.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize(device)
    if on_gpu:  # an op's self device time is its kernels'; the kernels' own rows would count them twice
        rows = [(e.key, e.self_device_time_total / 1e6, e.count) for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CPU]
    else:
        rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    split = split_by_category([(name, s) for name, s, _ in rows])
    total = sum(split.values())
    rows.sort(key=lambda r: r[1], reverse=True)
    return {
        "unit": "s",
        "clock": "cuda" if on_gpu else "cpu",
        "total_self_s": total,
        "split_s": split,
        "split_fraction": {k: (v / total if total else 0.0) for k, v in split.items()},
        "top_ops": [{"name": n, "self_s": s, "calls": c, "category": categorize(n)} for n, s, c in rows[:top]],
    }
