"""Peer quantization libraries run beside mgtq on the same model and inputs (`mgtq bench --peers`).

Each peer quantizes the same Linear layers mgtq quantizes (every `nn.Linear` of the transformer;
embedding, convs and norms stay bf16) of the same bf16 model:

    quanto-w4a8         optimum-quanto qint4 weights + qint8 activations, static scales from its
                        `Calibration` context on one forward (as the paper used)
    quanto-w4a16        optimum-quanto qint4 weights only
    torchao-w8a8        torchao Int8DynamicActivationInt8WeightConfig (dynamic per-token int8)
    torchao-w8a16       torchao Int8WeightOnlyConfig
    torchao-w4a16       torchao IntxWeightOnlyConfig(int4, per channel): on x86 the int4 values are
                        stored one per byte ("unpacked_to_int8"); counted as stored
    torchao-w4a8        torchao Int8DynamicActivationIntxWeightConfig(int4 per channel): on x86 its
                        reference/export format (activations quantized and dequantized, weights
                        dequantized, a bf16 GEMM: no integer GEMM), same storage caveat
    torchao-w4a16-packed  torchao PrototypeInt4WeightOnlyConfig(group_size=128): its packed int4 CPU
                        path (Int4OpaqueTensor, `_weight_int4pack_mm_for_cpu`)
    torchao-w4a8-da8w4  torchao's prototype Int8DynamicActivationInt4WeightConfig, its W4A8 with an
                        int8 GEMM (the da8w4 CPU kernel): skipped where its wheel lacks that kernel
    torchao-w4a16-int4  torchao Int4WeightOnlyConfig: its CUDA path (needs the mslk kernels), expected
                        to be skipped on CPU; kept so the report says so

A peer whose package is missing, or whose config does not run on this device, is skipped with a
message (`unavailable_reason`), never a crash. mgtq's harness loads this file from the checkout
(mgtq.bench.lab); optimum-quanto comes with `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# Indirection so tests can simulate a missing package.
import_module = importlib.import_module


@dataclass(frozen=True)
class Peer:
    """A peer configuration.

    package: module that must import (its absence skips the peer); install: how to get it;
    scheme: what it does, for the report; apply(model, run_forward): quantize `model` in place,
    calling `run_forward()` for calibration passes if the scheme needs them.
    """

    name: str
    family: str
    package: str
    install: str
    scheme: str
    apply: Callable[[nn.Module, Callable[[], object]], None]


def _linear_names(model: nn.Module) -> list[str]:
    # Every float Linear (mgtq's transformer uses an nn.Linear subclass), none of mgtq's quantized layers.
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _quanto(weights_only: bool) -> Callable[[nn.Module, Callable[[], object]], None]:
    def apply(model: nn.Module, run_forward: Callable[[], object]) -> None:
        quanto = import_module("optimum.quanto")
        # include = the Linears: quanto would otherwise also quantize Conv2d (kept bf16 in every format here).
        names = _linear_names(model)
        if weights_only:
            quanto.quantize(model, weights=quanto.qint4, include=names)
        else:
            quanto.quantize(model, weights=quanto.qint4, activations=quanto.qint8, include=names)
            with quanto.Calibration():
                run_forward()
        quanto.freeze(model)

    return apply


def _torchao(make_config: Callable[[], object]) -> Callable[[nn.Module, Callable[[], object]], None]:
    def apply(model: nn.Module, run_forward: Callable[[], object]) -> None:
        quantization = import_module("torchao.quantization")
        quantization.quantize_(model, make_config())  # default filter: every nn.Linear

    return apply


def _ao_w8a8():
    return import_module("torchao.quantization").Int8DynamicActivationInt8WeightConfig()


def _ao_w8a16():
    return import_module("torchao.quantization").Int8WeightOnlyConfig()


def _ao_w4a16():
    q = import_module("torchao.quantization")
    return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerAxis(0))


def _ao_w4a8():
    q = import_module("torchao.quantization")
    return q.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=q.PerAxis(0))


def _ao_int4():
    return import_module("torchao.quantization").Int4WeightOnlyConfig()


def _ao_int4_packed():
    return import_module("torchao.prototype.quantization.int4").PrototypeInt4WeightOnlyConfig(group_size=128)


def _ao_da8w4():
    return import_module("torchao.prototype.quantization.int4").Int8DynamicActivationInt4WeightConfig()


_QUANTO = dict(family="optimum-quanto", package="optimum.quanto", install="pip install -e '.[bench]'")
_TORCHAO = dict(family="torchao", package="torchao.quantization", install="pip install torchao")

PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("quanto-w4a8", scheme="qint4 weights + qint8 static activations (Calibration, one pass)",
         apply=_quanto(weights_only=False), **_QUANTO),
    Peer("quanto-w4a16", scheme="qint4 weights, bf16 activations", apply=_quanto(weights_only=True), **_QUANTO),
    Peer("torchao-w8a8", scheme="Int8DynamicActivationInt8WeightConfig", apply=_torchao(_ao_w8a8), **_TORCHAO),
    Peer("torchao-w8a16", scheme="Int8WeightOnlyConfig", apply=_torchao(_ao_w8a16), **_TORCHAO),
    Peer("torchao-w4a16", scheme="IntxWeightOnlyConfig(int4, per channel; one value per byte on x86)",
         apply=_torchao(_ao_w4a16), **_TORCHAO),
    Peer("torchao-w4a8", scheme="Int8DynamicActivationIntxWeightConfig(int4 per channel; on x86 its reference/"
         "export format: activations quantized and dequantized, weights dequantized, a bf16 GEMM; one value per "
         "byte)", apply=_torchao(_ao_w4a8), **_TORCHAO),
    Peer("torchao-w4a16-packed", scheme="PrototypeInt4WeightOnlyConfig(group_size=128): packed int4, "
         "_weight_int4pack_mm_for_cpu", apply=_torchao(_ao_int4_packed), **_TORCHAO),
    Peer("torchao-w4a8-da8w4", scheme="prototype Int8DynamicActivationInt4WeightConfig: packed int4, dynamic int8 "
         "activations, the da8w4 int8 GEMM", apply=_torchao(_ao_da8w4), **_TORCHAO),
    Peer("torchao-w4a16-int4", scheme="Int4WeightOnlyConfig (packed 4-bit, CUDA's mslk kernels)",
         apply=_torchao(_ao_int4), **_TORCHAO),
)}
# The peers that compete with mgtq's W4A8 with an int8 GEMM (goal: mgtq faster and smaller than each);
# torchao-w4a8 runs no integer GEMM on x86, so beating it says nothing.
W4A8_PEERS = ("quanto-w4a8", "torchao-w4a8-da8w4")


def unavailable_reason(name: str, device: str = "cpu") -> str | None:
    """None if peer `name` can run here; else why not (missing package, config fails on `device`).

    The check imports the package, then quantizes and runs a small bf16 Linear on `device`, so a
    configuration that needs kernels this build lacks is caught before the full model is built.
    """
    peer = PEERS[name]
    try:
        import_module(peer.package)
    except ImportError as err:
        return f"{name} skipped: package {peer.package!r} is not installed ({err}); install it with `{peer.install}`"
    probe = nn.Sequential(nn.Linear(256, 256)).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(4, 256, device=device, dtype=torch.bfloat16)
    try:
        with torch.inference_mode():
            peer.apply(probe, lambda: probe(x))
            probe(x)
    except Exception as err:  # any failure of a foreign config on this device means "does not run here"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return f"{name} skipped: {peer.scheme} does not run on {device} ({type(err).__name__}: {first})"
    return None
