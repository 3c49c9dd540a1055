"""Passes that walk a model: quantize, prepare/convert QAT, calibrate activations, count bytes.

Layers are addressed by qualified name (``model.named_modules()``);
``skip`` takes fnmatch patterns (``"*.proj_out"``, ``"transformer_blocks.0.*"``).
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from mgtq.utils import set_submodule

from .qlinear import QuantizedLinear, W4A8Linear, W4Linear
from .qtensor import INT8_MM_CHUNK_N, choose_int8_scale, tensor_nbytes

__all__ = [
    "quantize_weights_",
    "prepare_qat_",
    "convert_qat_",
    "calibrate_activations",
    "ActivationStats",
    "input_scales_from_stats",
    "model_weight_nbytes",
    "linear_names",
]


# ------------------------------------------------------------------------ selection


def linear_names(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Qualified names of the float ``nn.Linear`` layers (fake-quant ones included), minus ``skip``."""
    patterns = tuple(skip)
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def _check_names(model: nn.Module, names: Iterable[str], what: str) -> set[str]:
    names = set(names)
    modules = dict(model.named_modules())
    unknown = sorted(n for n in names if not isinstance(modules.get(n), nn.Linear))
    if unknown:
        raise KeyError(f"{what}: not nn.Linear layers of this model: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    return names


def _plan(model: nn.Module, skip: Iterable[str], a8_layers: Iterable[str]) -> tuple[list[str], set[str]]:
    """Targets (Linear names not skipped) and the A8 subset, validated before anything is replaced."""
    a8 = _check_names(model, a8_layers, "a8_layers")
    targets = linear_names(model, skip)
    skipped = a8 - set(targets)
    if skipped:
        raise ValueError(f"a8_layers also match skip patterns: {sorted(skipped)[:5]}")
    return targets, a8


def _scale_for(name: str, input_scales: Mapping[str, torch.Tensor | float] | None) -> torch.Tensor | float:
    if input_scales is None or name not in input_scales:
        raise KeyError(f"layer {name!r} is in a8_layers but has no entry in input_scales")
    return input_scales[name]


# --------------------------------------------------------------------------- passes


def quantize_weights_(
    model: nn.Module,
    group_size: int | None = None,
    skip: Iterable[str] = (),
    a8_layers: Iterable[str] = (),
    input_scales: Mapping[str, torch.Tensor | float] | None = None,
    chunk_n: int = INT8_MM_CHUNK_N,
    a8_weight_cache: bool = False,
) -> dict[str, str]:
    """Replace every ``nn.Linear`` (not matching ``skip``) in place by a real quantized module.

    Layers named in ``a8_layers`` become :class:`W4A8Linear` with
    ``input_scales[name]`` (always per-channel weights: the int GEMM needs it);
    the others :class:`W4Linear` with ``group_size`` (``None`` = per channel).
    A :class:`FakeQuantLinear` is converted from its *float* weight like any
    Linear (use :func:`convert_qat_` to keep its own settings).

    ``a8_weight_cache=True`` calls :meth:`W4A8Linear.enable_weight_cache` on
    the A8 layers (int8 weight copy in memory, oneDNN fused path on CPU: the
    fast option on AMX CPUs; costs +1 byte per weight of those layers).

    Returns:
        ``{qualified_name: "W4Linear" | "W4A8Linear"}`` for the replaced layers.
    """
    targets, a8 = _plan(model, skip, a8_layers)
    for name in a8:
        _scale_for(name, input_scales)  # fail before replacing anything
    done: dict[str, str] = {}
    for name in targets:
        linear = model.get_submodule(name)
        if name in a8:
            new: nn.Module = W4A8Linear.from_float(linear, _scale_for(name, input_scales), chunk_n=chunk_n)
            if a8_weight_cache:
                new.enable_weight_cache()
        else:
            new = W4Linear.from_float(linear, group_size=group_size)
        set_submodule(model, name, new)
        done[name] = type(new).__name__
    return done


def prepare_qat_(
    model: nn.Module,
    group_size: int | None = None,
    skip: Iterable[str] = (),
    a8_layers: Iterable[str] = (),
    input_scales: Mapping[str, torch.Tensor | float] | None = None,
) -> list[str]:
    """Replace ``nn.Linear`` layers in place by :class:`FakeQuantLinear` sharing their Parameters.

    ``a8_layers`` also fake-quantize their input to int8 with ``input_scales[name]``
    and use per-channel weights (so they convert to :class:`W4A8Linear`).

    Returns:
        the qualified names of the prepared layers.
    """
    from .fake_quant import FakeQuantLinear  # QAT needs torchao; imported only here

    targets, a8 = _plan(model, skip, a8_layers)
    for name in a8:
        _scale_for(name, input_scales)
    done = []
    for name in targets:
        linear = model.get_submodule(name)
        if isinstance(linear, FakeQuantLinear):
            continue
        if name in a8:
            new = FakeQuantLinear.from_linear(linear, None, _scale_for(name, input_scales))
        else:
            new = FakeQuantLinear.from_linear(linear, group_size)
        set_submodule(model, name, new)
        done.append(name)
    return done


def convert_qat_(model: nn.Module, chunk_n: int = INT8_MM_CHUNK_N) -> dict[str, str]:
    """Replace every :class:`FakeQuantLinear` by the real module computing the same thing.

    With an activation fake quantizer -> :class:`W4A8Linear`, else :class:`W4Linear`.
    """
    from .fake_quant import FakeQuantLinear, input_scale_of

    done: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, FakeQuantLinear):
            continue
        if input_scale_of(mod) is not None:
            new: nn.Module = W4A8Linear.from_fake_quant(mod, chunk_n=chunk_n)
        else:
            new = W4Linear.from_fake_quant(mod)
        set_submodule(model, name, new)
        done[name] = type(new).__name__
    return done


# ----------------------------------------------------------------------- calibration


@dataclass
class ActivationStats:
    """Running statistics of ``|x|`` over every element a layer received.

    ``histogram`` counts ``|x|`` in ``bins`` equal bins over ``[0, hist_max]``;
    when a batch exceeds ``hist_max`` the range is doubled (as often as needed)
    and old bins are merged pairwise, so the histogram stays exact up to bin
    resolution without storing activations.
    """

    bins: int = 2048
    absmax: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    batches: int = 0
    hist_max: float = 0.0
    histogram: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / max(self.count, 1)

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().reshape(-1).to(torch.float32)
        if a.numel() == 0:
            return
        bmax = float(a.max())
        if not math.isfinite(bmax):
            raise ValueError("non-finite activation seen during calibration")
        self.absmax = max(self.absmax, bmax)
        self.sum_abs += float(a.sum(dtype=torch.float64))
        self.count += a.numel()
        self.batches += 1
        self._update_histogram(a, bmax)

    def _update_histogram(self, a: torch.Tensor, bmax: float) -> None:
        if self.histogram.numel() == 0:
            self.histogram = torch.zeros(self.bins, dtype=torch.float64)
            self.hist_max = bmax if bmax > 0 else 1.0
        while bmax > self.hist_max:
            # Double the range: old bins 2i, 2i+1 fall into new bin i (exact merge).
            merged = self.histogram.view(-1, 2).sum(dim=1)
            self.histogram = torch.cat([merged, torch.zeros_like(merged)])
            self.hist_max *= 2.0
        h = torch.histc(a, bins=self.bins, min=0.0, max=self.hist_max)
        self.histogram += h.to(device="cpu", dtype=torch.float64)

    def percentile(self, p: float) -> float:
        """Upper edge of the histogram bin where the CDF of ``|x|`` reaches ``p`` percent."""
        if not 0.0 < p <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {p}")
        if self.count == 0:
            raise ValueError("no activations recorded")
        if p == 100.0:
            return self.absmax
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(p / 100.0, dtype=torch.float64)))
        edge = (idx + 1) * self.hist_max / self.bins
        return min(edge, self.absmax)

    def int8_scale(self, method: str = "absmax", percentile: float = 99.99) -> torch.Tensor:
        """Static int8 step: ``absmax / 127`` or ``percentile(|x|) / 127`` (clips outliers)."""
        if method == "absmax":
            bound = self.absmax
        elif method == "percentile":
            bound = self.percentile(percentile)
        else:
            raise ValueError(f"method must be 'absmax' or 'percentile', got {method!r}")
        return choose_int8_scale(bound)


@contextmanager
def calibrate_activations(
    model: nn.Module,
    layer_names: Iterable[str] | None = None,
    bins: int = 2048,
) -> Iterator[dict[str, ActivationStats]]:
    """Record input statistics of the given Linear layers (default: all) during the ``with`` body.

    Yields ``{name: ActivationStats}`` that fills up as the model runs; hooks
    are removed on exit (also on error).  Works for float, fake-quant and real
    quantized linears (anything named).  Example::

        with calibrate_activations(model) as stats:
            for batch in loader:
                model(**batch)
        scales = input_scales_from_stats(stats, method="percentile", percentile=99.99)
    """
    modules = dict(model.named_modules())
    if layer_names is None:
        names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, QuantizedLinear))]
    else:
        names = list(layer_names)
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(f"no such submodules: {missing[:5]}")
    stats = {n: ActivationStats(bins=bins) for n in names}
    handles = []

    def make_hook(st: ActivationStats):
        def hook(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                st.update(args[0])

        return hook

    try:
        for n in names:
            handles.append(modules[n].register_forward_pre_hook(make_hook(stats[n])))
        yield stats
    finally:
        for h in handles:
            h.remove()


def input_scales_from_stats(
    stats: Mapping[str, ActivationStats],
    method: str = "absmax",
    percentile: float = 99.99,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: int8 input scale}`` from calibration statistics (see :meth:`ActivationStats.int8_scale`)."""
    keys = stats.keys() if names is None else names
    return {n: stats[n].int8_scale(method, percentile) for n in keys}


# ------------------------------------------------------------------------- accounting


def model_weight_nbytes(model: nn.Module, linear_only: bool = True) -> int:
    """Bytes of weight storage actually held.

    Linear-like layers count their weight only (bias excluded): float
    ``nn.Linear`` -> ``weight.nbytes``; quantized modules -> ``weight_nbytes()``
    (packed int4 + scales).  With ``linear_only=False`` every other parameter
    and buffer of the model (embeddings, norms, biases, ...) is added.
    """
    total = 0
    counted: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            total += mod.weight_nbytes()
            counted.update(id(t) for t in (mod.weight_packed, mod.weight_scale, getattr(mod, "input_scale", None)))
        elif isinstance(mod, nn.Linear):
            total += tensor_nbytes(mod.weight)
            counted.add(id(mod.weight))
    if not linear_only:
        seen: set[int] = set()
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in counted and id(t) not in seen:
                seen.add(id(t))
                total += tensor_nbytes(t)
    return total
