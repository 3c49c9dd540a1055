"""The quantized transformer checkpoint format: its writer and its (strict) reader, side by side.

A quantized `transformer/` folder holds three files, and nothing else in mgtq knows their names:

    config.json                            the model's constructor arguments (MeissonicTransformer's), and a
                                           `quantization_config` (quant_method "mgtq", format version,
                                           schemes) so that loaders that do not know mgtq refuse it
    manifest.json                          `Manifest`: format version, per-layer `LayerScheme`, the
                                           float dtype, the sha256 of the weights file, provenance
    diffusion_pytorch_model.safetensors    quantized Linear NAME: NAME.weight_packed (uint8, two int4 per
                                           byte), NAME.weight_scale (fp32), [NAME.input_scale (fp32) for
                                           w4a8], [NAME.bias]; every other tensor under its usual key,
                                           in the manifest's float dtype. Metadata: {"mgtq": format+version}

`load` trusts nothing it reads: the manifest is parsed strictly, the weights file must match its
recorded sha256 and metadata, every tensor its expected dtype and shape, every scale be finite and
positive, and every named layer an `nn.Linear` of the model. Each failure is a one-line ValueError
(FileNotFoundError for a missing file) that names the file, the key and what to do.

`save` writes the same bytes for the same model and manifest (sorted JSON, one metadata key), so
two exports of one calibration run have the same sha256.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mgtq.config import from_mapping, plain_config, read_mapping, validate
from mgtq.dtypes import DTYPE_NAMES, FloatDtype, parse_dtype
from mgtq.files import atomic_write_text, describe_path
from mgtq.finite import all_finite
from mgtq.hashing import sha256_file
from mgtq.quantization.api import replace_linears_
from mgtq.quantization.qlinear import COMPUTE_DTYPES, QuantizedLinear, W4A8Linear, W4Linear
from mgtq.quantization.qtensor import check_group_size

__all__ = ["FORMAT", "FORMAT_VERSION", "PROVENANCE", "LayerScheme", "Manifest", "build_empty", "cast_float_",
           "assign_layer_", "describe", "install_quantized_", "is_quantized", "load", "load_pretrained",
           "quantization_config", "quantized_layers", "read_manifest", "save", "save_pretrained"]

FORMAT = "mgtq-quantized-transformer"
FORMAT_VERSION = 2  # 2: sha256 of the weights file in the manifest, one safetensors metadata key
CONFIG, MANIFEST, WEIGHTS = "config.json", "manifest.json", "diffusion_pytorch_model.safetensors"
HASHED = (CONFIG, WEIGHTS)  # the files the manifest records the sha256 of
SCHEMES: dict[str, type[QuantizedLinear]] = {"w4a16": W4Linear, "w4a8": W4A8Linear}
# Tensors of a quantized module that keep their own dtype whatever the checkpoint's float dtype.
_OWN_DTYPE = {"weight_packed": torch.uint8, "weight_scale": torch.float32, "input_scale": torch.float32}
_SCALES = ("weight_scale", "input_scale")
REEXPORT = "re-export the checkpoint (`mgtq export RUN --out DIR`)"
QUANT_METHOD = "mgtq"  # config.json's quantization_config.quant_method, as diffusers' quantizers name theirs
# The model class a checkpoint is read into (MeissonicTransformer): its callers pass it, so this format imports no
# model (mgtq.models.transformer imports this module).
Model = TypeVar("Model", bound=nn.Module)


# ------------------------------------------------------------------------------------ the format
@dataclass(frozen=True)
class LayerScheme:
    """How one Linear is quantized: "w4a16" (int4 weights, float activations, `group_size` columns
    per scale; None = one scale per output channel) or "w4a8" (int4 per-channel weights, static int8
    activations: group_size must be None)."""

    scheme: Literal["w4a16", "w4a8"]
    group_size: int | None = None

    def __post_init__(self):
        validate(self, "layer")
        check_group_size(self.group_size, "group_size", none="null")
        if self.scheme == "w4a8" and self.group_size is not None:
            raise ValueError(f"a w4a8 layer has per-channel weight scales: group_size must be null, got "
                             f"{self.group_size}")


@dataclass(frozen=True)
class Manifest:
    """What a quantized transformer folder holds (manifest.json); built by `describe`.

    layers: {qualified Linear name: LayerScheme}; float_dtype: dtype of every float tensor except
    the scales ("float32", "bfloat16", "float16"); files: {weights file name: sha256}, filled in by
    `save`. source_model / source_fingerprint / selection / recipe (PROVENANCE): where the weights
    came from (free-form, not needed to load).
    """

    layers: dict[str, LayerScheme] = field(default_factory=dict)
    float_dtype: FloatDtype = "float32"
    files: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    weight_bits: int = 4
    source_model: str | None = None
    source_fingerprint: str | None = None
    selection: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None

    def __post_init__(self):
        validate(self, "manifest")
        if self.format != FORMAT or self.format_version != FORMAT_VERSION:
            raise ValueError(f"format is {self.format!r} version {self.format_version!r}; this mgtq reads "
                             f"{FORMAT!r} version {FORMAT_VERSION}: {_version_fix(self.format, self.format_version)}")
        if self.weight_bits != 4:
            raise ValueError(f"weight_bits must be 4, got {self.weight_bits}")
        if not self.layers:
            raise ValueError("layers is missing or empty: a quantized checkpoint names its quantized Linears")

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.float_dtype)

    @property
    def provenance(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in PROVENANCE}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The Manifest fields that say where the weights came from (the rest is read off the model).
PROVENANCE = ("source_model", "source_fingerprint", "selection", "recipe")


def quantized_layers(model: nn.Module) -> dict[str, LayerScheme]:
    """{name: LayerScheme} of the quantized Linears of `model` (sorted by name; empty for a float model)."""
    layers = {}
    for name, module in sorted(model.named_modules()):
        if isinstance(module, W4A8Linear):
            layers[name] = LayerScheme("w4a8")
        elif isinstance(module, W4Linear):
            per_channel = module.group_size == module.in_features
            layers[name] = LayerScheme("w4a16", None if per_channel else module.group_size)
    return layers


def describe(model: nn.Module, provenance: Mapping[str, Any] | None = None) -> Manifest:
    """The Manifest of the quantized `model` as it is now: the one place a manifest is built.

    Layers (`quantized_layers`) and float dtype (the model's compute dtype) are read off the model, so
    they cannot disagree with it; `provenance` ({PROVENANCE key: value}) is given by whoever quantized
    it (`mgtq.scq.quantize_from_run`), else kept from the manifest the model was loaded with.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized Linears; quantize it first (mgtq.quantize_)")
    float_dtype = DTYPE_NAMES.get(getattr(model, "compute_dtype", None), "float32")
    if provenance is None:
        loaded = getattr(model, "mgtq_manifest", None)
        provenance = loaded.provenance if isinstance(loaded, Manifest) else {}
    unknown = sorted(set(provenance) - set(PROVENANCE))
    if unknown:
        raise ValueError(f"unknown provenance key {unknown[0]!r}; a manifest records {list(PROVENANCE)}")
    return Manifest(layers=layers, float_dtype=float_dtype, **provenance)


def cast_float_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the float parts (embeddings, norms, convs, biases) to `dtype`; int4 codes and scales stay."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
    return model


def _version_fix(fmt, version) -> str:
    """What to do about a manifest this mgtq cannot read: a newer format needs a newer mgtq; an older one, or one
    that is not a version number at all, a new export."""
    if fmt == FORMAT and isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return f"upgrade mgtq, or {REEXPORT}"
    return REEXPORT


def quantization_config(manifest: Manifest) -> dict:
    """config.json's `quantization_config`: what a loader needs to see that this folder is not a float model."""
    schemes = sorted({f"{layer.scheme}" + (f"-g{layer.group_size}" if layer.group_size else "")
                      for layer in manifest.layers.values()})
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "format_version": FORMAT_VERSION, "weight_bits": 4,
            "schemes": schemes, "manifest": MANIFEST}


# ----------------------------------------------------------------------------------------- write
def save(model: nn.Module, manifest: Manifest, folder: str | os.PathLike) -> Manifest:
    """Write `model` (quantized, float parts already in `manifest.float_dtype`) into the new or empty
    `folder`; returns the manifest as written (with the weights file's sha256).

    The caller makes the whole write atomic (`mgtq.files.atomic_directory`). Everything `load` checks
    is checked here first, so a checkpoint that saves also loads.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty; save a quantized transformer into a new folder")
    if quantized_layers(model) != manifest.layers:
        raise ValueError("the manifest's layers do not match the model's quantized Linears; build the manifest "
                         "from the model (mgtq.quantization.checkpoint.describe)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _check_tensors(tensors, model, manifest.dtype, "cannot save the quantized transformer", advice=_SAVE_ADVICE,
                   values_advice=_DAMAGED_ADVICE)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(model).__name__, **plain_config(model.config),
              "quantization_config": quantization_config(manifest)}
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    # One metadata key: safetensors writes its metadata map in no fixed order, one entry has only one.
    save_file(tensors, str(folder / WEIGHTS), metadata={"mgtq": _metadata_value()})
    # config.json too: a valid-looking edit of it (RoPE axes, say) would build another model over the same weights.
    written = dataclasses.replace(manifest, files={name: sha256_file(folder / name) for name in HASHED})
    atomic_write_text(folder / MANIFEST, json.dumps(written.to_dict(), indent=2, sort_keys=True) + "\n")
    return written


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> Manifest:
    """`MeissonicTransformer.save_pretrained` of a quantized model: `save` with `describe(model)`. As diffusers'
    writer, into `folder`, leaving files of others alone; its own three files are each replaced by a rename,
    and weight files an earlier save left (`diffusion_pytorch_model*`: a float model's shards) are removed."""
    from mgtq.files import atomic_entries

    with atomic_entries(folder, stale=lambda name: name.startswith("diffusion_pytorch_model")) as tmp:
        return save(model, describe(model), tmp)


def remove_stale_manifest(folder: str | os.PathLike) -> None:
    """After a float model's `save_pretrained` into `folder`: an mgtq manifest an earlier quantized save left
    there would make the folder read as a (damaged) quantized checkpoint; it is removed. A manifest.json that
    is not mgtq's stays."""
    path = Path(folder) / MANIFEST
    try:
        ours = path.is_file() and json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if ours:
        path.unlink()


def _metadata_value() -> str:
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION}, sort_keys=True)


# ------------------------------------------------------------------------------------------ read
def is_quantized(folder: str | os.PathLike) -> bool:
    """Whether `folder` (a transformer folder) is a quantized checkpoint (it has a manifest).

    A folder whose weights are mgtq-quantized but whose manifest is missing raises ValueError: it
    must never be mistaken for a float model.
    """
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return True
    config = folder / CONFIG
    if config.is_file():
        quantization = read_mapping(config, fmt="json").get("quantization_config")
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method == QUANT_METHOD:
            raise ValueError(f"{config} says the weights are mgtq-quantized but {folder / MANIFEST} is missing; "
                             f"the checkpoint is incomplete: {REEXPORT}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        return False
    try:
        with safe_open(str(weights), "pt") as f:
            marked = "mgtq" in (f.metadata() or {}) or any(k.endswith(".weight_packed") for k in f.keys())
    except (SafetensorError, OSError):
        return False  # a damaged float file: the float loader reports it
    if marked:
        raise ValueError(f"{weights} holds mgtq-quantized weights but {folder / MANIFEST} is missing; the "
                         f"checkpoint is incomplete: {REEXPORT}")
    return False


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The folder's manifest.json, strictly validated (unknown keys and bad values are errors)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} {describe_path(path)}, not a manifest file; {REEXPORT}")
    data = _read_checkpoint_json(path)
    # Each layer records its group size; manifests written before that also had a summary key, which no load reads
    # (and the earlier writers filled in two ways: the layers' common size, or the recipe's, which a layer as wide
    # as its group does not have), so it is dropped; the manifest's checksum covers it like the rest.
    data.pop("group_size", None)
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format is {data.get('format')!r} version {data.get('format_version')!r}; this "
                         f"mgtq reads {FORMAT!r} version {FORMAT_VERSION}: "
                         f"{_version_fix(data.get('format'), data.get('format_version'))}")
    try:
        return from_mapping(Manifest, data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}; {REEXPORT}") from None


def read_config(folder: str | os.PathLike, cls: type[nn.Module]) -> dict:
    """`cls`'s constructor arguments from config.json (unknown keys are errors)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {REEXPORT}")
    data = _read_checkpoint_json(path)
    config = {k: v for k, v in data.items() if not k.startswith("_") and k != "quantization_config"}
    quantization = data.get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        raise ValueError(f"{path}: quantization_config must be a mapping, got {type(quantization).__name__}; "
                         f"fix the file or {REEXPORT}")
    method = (quantization or {}).get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise ValueError(f"{path}: quantization_config.quant_method is {method!r}; mgtq reads its own "
                         f"({QUANT_METHOD!r}) checkpoints only")
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {sorted(known)}); fix the file or {REEXPORT}")
    return config


def _read_checkpoint_json(path: Path) -> dict:
    """`read_mapping` of a checkpoint's JSON file, its errors saying how to get a sound one."""
    try:
        return read_mapping(path, fmt="json")
    except ValueError as err:
        raise ValueError(f"{err}; {REEXPORT}") from None


def build_empty(cls: type[Model], config: Mapping, manifest: Manifest) -> Model:
    """`cls(**config)` on the meta device (no memory) with the manifest's quantized modules in place."""
    try:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = cls(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config: {err}; {REEXPORT}") from None
    return install_quantized_(model, manifest.layers)


def install_quantized_(model: nn.Module, layers: Mapping[str, LayerScheme]) -> nn.Module:
    """Replace each named `nn.Linear` by an empty (meta-device) quantized module of its scheme, ready
    for `load_state_dict(..., assign=True)`, through the one replacement pass (`replace_linears_`).
    Every name is checked before anything is replaced."""
    modules = dict(model.named_modules())
    for name in layers:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            what = "does not exist" if linear is None else f"is a {type(linear).__name__}, not an nn.Linear"
            raise ValueError(f"layers.{name}: the module {what} in this model; {REEXPORT}")
    try:
        replace_linears_(model, {name: (f"empty-{layer.scheme}", layer.group_size) for name, layer in layers.items()})
    except ValueError as err:
        raise ValueError(f"{err}; {REEXPORT}") from None
    return model


def assign_layer_(layer: QuantizedLinear, codes: torch.Tensor, scales: torch.Tensor,
                  input_scale: torch.Tensor | float | None = None, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """Give a quantized module of `build_empty` (meta tensors) its values, under the keys `load` reads.

    codes (out, in/2) uint8, two int4 codes per byte; scales (out, groups) weight scales; input_scale
    the static int8 step of a w4a8 layer (None for w4a16); bias in the float dtype, if the layer has
    one. A missing, extra or misshapen tensor is a ValueError.
    """
    if codes.dtype != _OWN_DTYPE["weight_packed"]:
        raise ValueError(f"codes must be {_OWN_DTYPE['weight_packed']} (two int4 codes per byte), got {codes.dtype}")
    state = {"weight_packed": codes, "weight_scale": scales.to(_OWN_DTYPE["weight_scale"])}
    if input_scale is not None:
        state["input_scale"] = torch.as_tensor(input_scale, dtype=_OWN_DTYPE["input_scale"])
    if bias is not None:
        state["bias"] = bias
    needed = set(layer.state_dict())
    if set(state) != needed:
        raise ValueError(f"a {type(layer).__name__} takes {sorted(needed)}, got {sorted(state)}")
    for key, t in layer.state_dict().items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise ValueError(f"{key} of a {type(layer).__name__} is {tuple(t.shape)}, got {tuple(state[key].shape)}")
    layer.load_state_dict(state, assign=True)
    return layer


def load(folder: str | os.PathLike, cls: type[Model], dtype: torch.dtype | str | None = None) -> Model:
    """The quantized transformer of `folder`, a `cls` (MeissonicTransformer), validated (see module docstring), in
    eval mode.

    `dtype` casts the float parts after loading (int4 codes and scales are never cast).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the transformer/ folder of a quantized checkpoint")
    dtype = None if dtype is None else parse_dtype(dtype)
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{folder}: quantized layers compute in float32, bfloat16 or float16; torch_dtype "
                         f"{dtype} cannot run them (leave it out for the checkpoint's own dtype)")
    manifest = read_manifest(folder)
    weights = folder / WEIGHTS
    # Checkpoints written before config.json was hashed name the weights only.
    if set(manifest.files) not in ({WEIGHTS}, set(HASHED)):
        raise ValueError(f"{folder / MANIFEST}: files must name {list(HASHED)} (or {WEIGHTS!r} alone), got "
                         f"{sorted(manifest.files)}; {REEXPORT}")
    for name, expected in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} {describe_path(path)}; {REEXPORT}")
        digest = sha256_file(path)
        if digest != expected:
            raise ValueError(f"{path}: sha256 {digest[:16]}… differs from files.{name} in {MANIFEST} "
                             f"({expected[:16]}…): the file was modified or damaged; {REEXPORT}")
    config = read_config(folder, cls)
    _check_metadata(weights)
    _check_layer_counts(config, weights)
    try:
        model = build_empty(cls, config, manifest)
    except ValueError as err:
        where = folder / (CONFIG if str(err).startswith("config:") else MANIFEST)
        raise ValueError(f"{where}: {str(err).removeprefix('config: ')}") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is damaged or truncated ({err}); {REEXPORT}") from None
    _check_tensors(tensors, model, manifest.dtype, weights)
    model.load_state_dict(tensors, assign=True, strict=True)
    if dtype is not None:
        cast_float_(model, dtype)
    model.token_hook = None
    model.mgtq_manifest = manifest  # so save_pretrained keeps its provenance (describe)
    return model.eval().requires_grad_(False)


def load_pretrained(cls: type[Model], folder: str | os.PathLike, subfolder: str | None = None, torch_dtype=None,
                    device_map=None, **unsupported) -> Model:
    """`MeissonicTransformer.from_pretrained` of a quantized folder: `load`, with diffusers' dtype and device
    arguments. Options that only make sense for float weights are errors, never silently ignored."""
    ignored = {"local_files_only", "use_safetensors", "low_cpu_mem_usage"}
    # diffusers' loaders pass their flags' defaults (disable_mmap=False, …): asking for nothing is no error
    bad = sorted(k for k, v in unsupported.items() if k not in ignored and v is not None and v is not False)
    if bad:
        raise ValueError(f"{folder}: a quantized mgtq transformer loads with torch_dtype= and device_map= only; "
                         f"unsupported options {bad}")
    folder = Path(folder) / subfolder if subfolder else Path(folder)
    model = load(folder, cls, dtype=None if torch_dtype == "auto" else torch_dtype)
    if device_map is not None:
        try:
            device = torch.device(device_map) if isinstance(device_map, (str, torch.device)) else None
        except RuntimeError:
            device = None
        if device is None:
            raise ValueError(f"device_map must name one device (\"cpu\", \"cuda\", \"cuda:1\"): a quantized mgtq "
                             f"transformer is not split across devices; got {device_map!r}")
        model.to(device)
    return model


def _check_layer_counts(config: Mapping, weights: Path) -> None:
    """Before the model is built: layer counts its weights can hold (`num_layers: 10**9` would be allocated first)."""
    from mgtq.components import check_layer_counts

    try:
        with safe_open(str(weights), "pt") as f:
            count = len(list(f.keys()))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is damaged or truncated ({err}); {REEXPORT}") from None
    check_layer_counts(config, count, weights.parent / CONFIG)


def _check_metadata(weights: Path) -> None:
    try:
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is damaged or truncated ({err}); {REEXPORT}") from None
    if metadata.get("mgtq") != _metadata_value():
        raise ValueError(f"{weights}: metadata key 'mgtq' is {metadata.get('mgtq')!r}, expected "
                         f"{_metadata_value()!r}; {REEXPORT}")


def _expected(model: nn.Module, float_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{state-dict key: (shape, dtype)} of `model` stored in `float_dtype`."""
    expected = {}
    for prefix, module in model.named_modules():
        quantized = isinstance(module, QuantizedLinear)
        own = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for name, t in own:
            dtype = _OWN_DTYPE[name] if quantized and name in _OWN_DTYPE else (
                float_dtype if t.is_floating_point() else t.dtype)
            expected[f"{prefix}.{name}" if prefix else name] = (tuple(t.shape), dtype)
    return expected


# What to do when a model about to be saved does not hold what its checkpoint would (the loader says REEXPORT).
_SAVE_ADVICE = ("the model does not hold what a checkpoint of it stores: save it in float32, bfloat16 or float16 "
                "(pipe.to(torch.bfloat16), say) and without layerwise casting or other storage changes")
_DAMAGED_ADVICE = ("the model's values are damaged, and a load would refuse them; nothing was written: find what "
                   "changed them (a NaN in calibration, a bad edit) and save an undamaged model")


def _check_tensors(tensors: Mapping[str, torch.Tensor], model: nn.Module, float_dtype: torch.dtype,
                   path: Path | str, advice: str = REEXPORT, values_advice: str | None = None) -> None:
    """`tensors` against what `model` in `float_dtype` stores; errors start with `path` (the file, or what failed)
    and end with `advice` (a wrong key, shape or dtype) or `values_advice` (NaN, infinite or non-positive scales)."""
    values_advice = values_advice or advice
    expected = _expected(model, float_dtype)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} in all) though the manifest and "
                         f"config need it; {advice}")
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all) that the manifest and config "
                         f"do not account for; {advice}")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{path}: {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}; {advice}")
        if t.is_floating_point():
            if not all_finite(t):
                raise ValueError(f"{path}: {key} holds NaN or infinite values; {values_advice}")
            if key.rpartition(".")[2] in _SCALES and not bool((t > 0).all()):
                raise ValueError(f"{path}: {key} holds scales ≤ 0 (scales must be positive); {values_advice}")
