"""Passes that walk a model: quantize, prepare/convert QAT, calibrate activation scales, count bytes.

One entry point, torchao-style: ``quantize_(model_or_pipeline, W4A16Config() | W4A8Config() | SCQConfig(),
overrides={"*.proj_out": None})``; `replace_linears_` is the one place a Linear becomes quantized.
Layers are addressed by qualified name (``model.named_modules()``); patterns are fnmatch
(``"*.proj_out"``, ``"transformer_blocks.0.*"``).
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Mapping

import torch
from torch import nn

from mgtq.config import validate
from mgtq.modules import set_submodule, unwrapped

from .qlinear import QuantizedLinear, W4A8Linear, W4Linear
from .qtensor import INT8_MM_CHUNK_N, check_group_size, choose_int8_scale, tensor_nbytes
from .selection import A8_FRACTION, select_a8_layers

__all__ = [
    "quantize_",
    "W4A16Config",
    "W4A8Config",
    "SCQConfig",
    "replace_linears_",
    "calibrate_on_prompts",
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


def unmatched_patterns(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The fnmatch `patterns` that match none of `names` (a typo would silently select nothing)."""
    names = list(names)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


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
    layers = {n: ("fake-w4a8", _scale_for(n, input_scales)) if n in a8 else ("fake-w4a16", group_size)
              for n in targets if not isinstance(model.get_submodule(n), FakeQuantLinear)}
    return list(replace_linears_(model, layers))


def convert_qat_(model: nn.Module, chunk_n: int = INT8_MM_CHUNK_N) -> dict[str, str]:
    """Replace every :class:`FakeQuantLinear` by the real module computing the same thing.

    With an activation fake quantizer -> :class:`W4A8Linear`, else :class:`W4Linear`.
    """
    from .fake_quant import FakeQuantLinear

    layers = {name: ("from-fake", None) for name, mod in model.named_modules() if isinstance(mod, FakeQuantLinear)}
    return replace_linears_(model, layers, chunk_n=chunk_n)


# ------------------------------------------------------------------- configs, quantize_

def _check_percentile(where: str, percentile: float) -> None:
    if not 0 < percentile <= 100:
        raise ValueError(f"{where}.percentile must be a number in (0, 100], got {percentile!r}")


@dataclass(frozen=True)
class W4A16Config:
    """int4 weights (symmetric; one scale per output channel, or per `group_size` input columns), float
    activations: weight-only PTQ, no calibration data needed."""

    group_size: int | None = None

    def __post_init__(self):
        validate(self, "W4A16Config")
        check_group_size(self.group_size, "W4A16Config.group_size")


@dataclass(frozen=True)
class W4A8Config:
    """int4 per-channel weights and static int8 activations: each layer's input scale is calibrated
    (`scale_method` "absmax" or "percentile" of |x|) on calibration prompts."""

    scale_method: Literal["absmax", "percentile"] = "absmax"
    percentile: float = 99.99

    def __post_init__(self):
        validate(self, "W4A8Config")
        _check_percentile("W4A8Config", self.percentile)


@dataclass(frozen=True)
class SCQConfig:
    """SCQ's secondary rule as a PTQ pass (paper §4.1): the `fraction` of layers with the lowest input
    magnitude (selection "lowest"; "random" is the paper's ablation) get W4A8, the rest W4A16 with
    `group_size`. For the full method (QAT on the model's own images first) use `mgtq calibrate`."""

    fraction: float = A8_FRACTION
    selection: Literal["lowest", "random"] = "lowest"
    group_size: int | None = None
    scale_method: Literal["absmax", "percentile"] = "absmax"
    percentile: float = 99.99
    seed: int = 0

    def __post_init__(self):
        validate(self, "SCQConfig")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"SCQConfig.fraction must be a number in [0, 1], got {self.fraction!r}")
        check_group_size(self.group_size, "SCQConfig.group_size")
        _check_percentile("SCQConfig", self.percentile)


QuantConfig = W4A16Config | W4A8Config | SCQConfig
CONFIGS = {"w4a16": W4A16Config, "w4a8": W4A8Config, "scq": SCQConfig}


def quantize_(
    model,
    config: QuantConfig,
    overrides: Mapping[str, QuantConfig | None] | None = None,
    calibration_prompts: list[str] | None = None,
    activation_stats: Mapping[str, ActivationStats] | None = None,
    input_scales: Mapping[str, torch.Tensor | float] | None = None,
) -> dict[str, str]:
    """Quantize the Linears of a MeissonicTransformer, any nn.Module or an MGTPipeline's transformer, in place.

    `config` applies to every ``nn.Linear``; `overrides` maps fnmatch patterns of qualified layer names to
    another config, or None to keep the layer float (first matching pattern wins; like torchao's
    FqnToConfig). W4A8 and SCQ layers need activation statistics: pass `calibration_prompts` (a pipeline
    runs them, seeds 0, 1, …), `activation_stats` from ``with calibrate_activations(model) as stats:``, or
    `input_scales` ({name: scale}, W4A8 only). Everything is checked before any layer is replaced.

    Returns:
        ``{qualified_name: "W4Linear" | "W4A8Linear"}`` for the replaced layers.
    """
    target = _module_of(model)
    plan = _plan_configs(target, config, overrides or {})
    _check_materialized(target, plan)
    needs_stats = any(isinstance(c, (W4A8Config, SCQConfig)) for c in plan.values())
    if needs_stats and input_scales is None and activation_stats is None:
        if calibration_prompts is None:
            raise ValueError("W4A8 and SCQ calibrate int8 activation scales: pass calibration_prompts=[...] (with a "
                             "pipeline), activation_stats= from `with mgtq.calibrate_activations(model) as stats:`, "
                             "or input_scales=; W4A16Config needs none")
        activation_stats = calibrate_on_prompts(model, calibration_prompts, [n for n, c in plan.items() if c is not None])
    layers = _resolve(plan, activation_stats, input_scales)
    return replace_linears_(target, layers)


def _module_of(model) -> nn.Module:
    """The nn.Module to quantize: a pipeline's transformer, the module under torch.compile's wrapper."""
    module = getattr(model, "transformer", model)
    module = unwrapped(module)
    if not isinstance(module, nn.Module):
        raise TypeError(f"quantize_ takes an nn.Module or a pipeline with a .transformer, got {type(model).__name__}")
    return module


def _check_materialized(model: nn.Module, names) -> None:
    """Refuse Linears whose weights are not there: accelerate's sequential offload keeps them on "meta" until each
    forward, and quantizing such a layer would quantize an empty tensor."""
    empty = [n for n in names if model.get_submodule(n).weight.is_meta]
    if empty:
        raise ValueError(f"{len(empty)} Linear(s), e.g. {empty[0]!r}, hold no weights (on 'meta': sequential CPU "
                         "offload, or a model built without weights); quantize first and enable offload after, or "
                         "call pipe.remove_all_hooks() and load the weights again")


def _plan_configs(model: nn.Module, config, overrides: Mapping[str, QuantConfig | None]) -> dict[str, QuantConfig]:
    """{Linear name: its config} (layers an override maps to None are left out)."""
    for where, c in [("config", config), *((f"overrides[{p!r}]", c) for p, c in overrides.items())]:
        if c is None and where != "config":
            continue
        if not isinstance(c, (W4A16Config, W4A8Config, SCQConfig)):
            raise TypeError(f"{where} must be a W4A16Config, W4A8Config or SCQConfig (mgtq.quantization.api), got "
                            f"{type(c).__name__}")
    names = linear_names(model)
    if not names:
        raise ValueError("the model has no float nn.Linear layers to quantize (already quantized?)")
    unused = unmatched_patterns(names, overrides)
    if unused:
        raise ValueError(f"override pattern {unused[0]!r} matches no nn.Linear of the model (e.g. {names[0]!r})")
    plan = {}
    for name in names:
        chosen = next((c for p, c in overrides.items() if fnmatch.fnmatchcase(name, p)), config)
        if chosen is not None:
            plan[name] = chosen
    return plan


def _resolve(plan: Mapping[str, QuantConfig], stats, input_scales) -> dict[str, tuple[str, object]]:
    """{name: ("w4a16", group_size) | ("w4a8", input scale)}: SCQ's selection made, every scale at hand."""
    layers: dict[str, tuple[str, object]] = {}
    for config in dict.fromkeys(plan.values()):  # each distinct config once, in order
        names = [n for n, c in plan.items() if c == config]  # equal configs, not only the same object
        if isinstance(config, W4A16Config):
            layers.update({n: ("w4a16", config.group_size) for n in names})
            continue
        a8 = names
        if isinstance(config, SCQConfig):
            a8 = _select_lowest(names, stats, config)
            layers.update({n: ("w4a16", config.group_size) for n in names if n not in set(a8)})
        for name in a8:
            if input_scales is not None and name in input_scales:
                layers[name] = ("w4a8", input_scales[name])
            elif stats is not None and name in stats and stats[name].count:
                layers[name] = ("w4a8", stats[name].int8_scale(config.scale_method, config.percentile))
            else:
                raise KeyError(f"layer {name!r} gets int8 activations but has no input scale and no calibration "
                               "statistics; calibrate on prompts that run it")
    return dict(sorted(layers.items()))


def _select_lowest(names: list[str], stats, config: SCQConfig) -> list[str]:
    """SCQ's rule (mgtq.quantization.selection) on the calibration prompts' mean |input| per layer."""
    if config.selection != "random" and (stats is None or any(n not in stats or not stats[n].count for n in names)):
        raise ValueError("SCQConfig selects layers by input magnitude: pass calibration_prompts or activation_stats "
                         "covering every layer")
    scores = {n: stats[n].mean_abs if config.selection != "random" else 0.0 for n in names}
    return select_a8_layers(scores, config.fraction, config.selection, config.seed)


def _builders() -> dict:
    """How each kind of layer is built from the float ``nn.Linear`` it replaces (its argument second)."""

    def fake(linear, group_size=None, input_scale=None):
        from .fake_quant import FakeQuantLinear  # QAT needs torchao; imported only here

        return FakeQuantLinear.from_linear(linear, group_size, input_scale) if input_scale is not None else \
            FakeQuantLinear.from_linear(linear, group_size)

    def empty(linear, scheme, group_size):
        cls = {"w4a16": W4Linear, "w4a8": W4A8Linear}[scheme]
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group_size,
                   device="meta")

    def from_fake(fake_quant, chunk_n):
        from .fake_quant import input_scale_of

        if input_scale_of(fake_quant) is not None:
            return W4A8Linear.from_fake_quant(fake_quant, chunk_n=chunk_n)
        return W4Linear.from_fake_quant(fake_quant)

    return {
        "w4a16": lambda linear, group_size, chunk_n: W4Linear.from_float(linear, group_size=group_size),
        "w4a8": lambda linear, scale, chunk_n: W4A8Linear.from_float(linear, scale, chunk_n=chunk_n),
        "fake-w4a16": lambda linear, group_size, chunk_n: fake(linear, group_size),
        "fake-w4a8": lambda linear, scale, chunk_n: fake(linear, None, scale),
        "empty-w4a16": lambda linear, group_size, chunk_n: empty(linear, "w4a16", group_size),
        "empty-w4a8": lambda linear, group_size, chunk_n: empty(linear, "w4a8", group_size),
        "from-fake": lambda fake_quant, _, chunk_n: from_fake(fake_quant, chunk_n),
    }


def replace_linears_(model: nn.Module, layers: Mapping[str, tuple[str, object]],
                     chunk_n: int = INT8_MM_CHUNK_N) -> dict[str, str]:
    """The one place an ``nn.Linear`` becomes a quantized module, for quantizing, QAT and loading alike.

    layers: ``{name: (kind, argument)}`` with kind "w4a16" (group size) or "w4a8" (input scale) for real
    modules from the float weights, "fake-w4a16" / "fake-w4a8" for QAT's FakeQuantLinear, "empty-w4a16" /
    "empty-w4a8" (group size) for meta-device modules a checkpoint's tensors are then assigned to, "from-fake"
    for the real module a trained FakeQuantLinear computes (convert_qat_). Every
    module is built before any is swapped in, so an error (it names the layer) leaves the model unchanged.
    Returns ``{name: module class name}``.
    """
    _check_names(model, layers, "layers")
    builders = _builders()
    unknown = sorted({kind for kind, _ in layers.values()} - set(builders))
    if unknown:
        raise ValueError(f"unknown layer kind {unknown[0]!r}; use one of {sorted(builders)}")
    built = {}
    for name, (kind, arg) in layers.items():
        try:
            built[name] = builders[kind](model.get_submodule(name), arg, chunk_n)
        except ValueError as err:
            raise ValueError(f"layers.{name}: {err}") from None
    for name, module in built.items():
        set_submodule(model, name, module)
    return {name: type(module).__name__ for name, module in built.items()}


def calibrate_on_prompts(model, prompts: list[str], layer_names: Iterable[str] | None = None,
                         batch_size: int = 8) -> dict[str, ActivationStats]:
    """Activation-scale calibration on prompts: `calibrate_activations` while `model` (a pipeline) generates
    `prompts` (seeds 0, 1, …); returns the input statistics of the transformer's Linears."""
    if not hasattr(model, "transformer") or not callable(model):
        raise TypeError("calibration_prompts need a pipeline (its text encoder and sampler run them); for a bare "
                        "module, pass activation_stats from `with calibrate_activations(module) as stats:`")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("calibration_prompts must be a non-empty list of str")
    with calibrate_activations(model, layer_names) as stats:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            model(chunk, seed=list(range(start, start + len(chunk))), output_type="latent", progress=False)
    return stats


def quantize_weights_(
    model: nn.Module,
    group_size: int | None = None,
    skip: Iterable[str] = (),
    a8_layers: Iterable[str] = (),
    input_scales: Mapping[str, torch.Tensor | float] | None = None,
    chunk_n: int = INT8_MM_CHUNK_N,
    a8_weight_cache: bool = False,
) -> dict[str, str]:
    """Deprecated: use ``quantize_(model, W4A16Config(group_size), overrides={...})``; kept for one release."""
    warnings.warn("quantize_weights_ is deprecated; use mgtq.quantize_(model, mgtq.W4A16Config(...)) with "
                  "overrides={pattern: W4A8Config() or None} and input_scales=", DeprecationWarning, stacklevel=2)
    model = _module_of(model)
    targets, a8 = _plan(model, skip, a8_layers)
    for name in a8:
        _scale_for(name, input_scales)  # fail before replacing anything
    layers = {n: ("w4a8", _scale_for(n, input_scales)) if n in a8 else ("w4a16", group_size) for n in targets}
    done = replace_linears_(model, layers, chunk_n=chunk_n)
    if a8_weight_cache:
        for name in a8:
            model.get_submodule(name).enable_weight_cache()
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
        # float64 where the device has it (MPS has none: its float32 sum is ample for ranking layers)
        self.sum_abs += float(a.sum(dtype=torch.float32 if a.device.type == "mps" else torch.float64))
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
    """Activation-scale calibration: record input statistics of the given Linear layers (default: all)
    during the ``with`` body, for the int8 input scales (:func:`input_scales_from_stats`).

    `model` may be a pipeline (its transformer's layers are recorded).

    Yields ``{name: ActivationStats}`` that fills up as the model runs; hooks
    are removed on exit (also on error).  Works for float, fake-quant and real
    quantized linears (anything named).  Example::

        with calibrate_activations(model) as stats:
            for batch in loader:
                model(**batch)
        scales = input_scales_from_stats(stats, method="percentile", percentile=99.99)
    """
    modules = dict(_module_of(model).named_modules())
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
