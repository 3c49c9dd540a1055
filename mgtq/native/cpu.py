"""The CPU class of this machine, read once at run time: what mgtq's kernel choice depends on.

``amx-int8``, ``amx-bf16``, ``avx512-vnni``, ``avx2``, ``generic`` (:data:`CPU_CLASSES`); ``MGTQ_CPU_CLASS``
overrides the detection (benchmarks of another class's dispatch on this machine, tests).
"""

from __future__ import annotations

import functools
import os
import platform

import torch

__all__ = ["CPU_CLASSES", "CPU_CLASS_ENV", "cpu_class", "detect_cpu_class", "cpu_flags", "cpu_model", "cpu_isa",
           "is_x86"]

# CPU classes, fastest int8 first: AMX with int8 tiles, AMX with bf16 tiles only, AVX512 with VNNI,
# AVX2 (the floor torch's x86 wheels need); generic: any other architecture (aarch64 and Apple silicon,
# ppc64le, …), where neither mgtq's kernels nor the x86 rules of the kernel choice apply.
CPU_CLASSES = ("amx-int8", "amx-bf16", "avx512-vnni", "avx2", "generic")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
CPU_CLASS_ENV = "MGTQ_CPU_CLASS"
# The instruction-set extensions mgtq's and torch's CPU kernels choose between, as /proc/cpuinfo names them.
KERNEL_ISA = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def is_x86(machine: str | None = None) -> bool:
    """Whether this machine (or the given ``platform.machine()`` name) is an x86 CPU."""
    return (platform.machine() if machine is None else machine).lower() in X86_MACHINES


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo's, else the platform's; None where neither says)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = None
    return name or platform.processor() or None


def cpu_isa(flags: set[str] | None = None) -> list[str]:
    """Which of the extensions the kernels choose between (``KERNEL_ISA``) this CPU has."""
    flags = cpu_flags() if flags is None else flags
    return [x for x in KERNEL_ISA if x in flags]


def detect_cpu_class(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The CPU class of this machine (or of the given /proc/cpuinfo ``flags`` and ``platform.machine()``
    name): see ``CPU_CLASSES``.

    Reads torch's own CPU feature checks where /proc/cpuinfo says nothing (not Linux).
    """
    if not is_x86(machine):
        return "generic"  # /proc/cpuinfo's "Features" there name other extensions; torch's probes are x86 ones
    flags = cpu_flags() if flags is None else flags
    cpu = getattr(torch, "cpu", None)
    def has(flag: str, probe: str) -> bool:
        if flags:
            return flag in flags
        check = getattr(cpu, probe, None)
        return bool(check()) if check is not None else False

    if has("amx_int8", "_is_amx_tile_supported"):
        return "amx-int8"
    if has("amx_bf16", "_is_amx_tile_supported"):
        return "amx-bf16"
    if has("avx512_vnni", "_is_vnni_supported"):
        return "avx512-vnni"
    return "avx2"


@functools.lru_cache(maxsize=None)
def _machine_cpu_class(override: str | None) -> str:
    if override is None:
        return detect_cpu_class()
    if override not in CPU_CLASSES:
        raise ValueError(f"{CPU_CLASS_ENV}={override!r} is not a CPU class; use one of {CPU_CLASSES} or unset it")
    return override


@torch.compiler.assume_constant_result
def cpu_class() -> str:
    """This machine's CPU class (``MGTQ_CPU_CLASS`` overrides the detection; read once per value)."""
    return _machine_cpu_class(os.environ.get(CPU_CLASS_ENV) or None)
