"""Export an SCQ run to a real low-bit checkpoint, and load it back.

checkpoint/
  model_index.json, vqvae/, text_encoder/, tokenizer/, scheduler/   copied from the source model
  transformer/config.json                     the MeissonicTransformer config
  transformer/manifest.json                   format version, per-layer scheme, group size, fingerprints, recipe
  transformer/diffusion_pytorch_model.safetensors
      quantized Linear NAME: NAME.weight_packed (uint8, two int4 per byte), NAME.weight_scale,
      [NAME.input_scale for A8 layers], [NAME.bias]; every other tensor under its usual key.

Only safetensors; written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mgtq.models.transformer import MeissonicTransformer, plain_config
from mgtq.quantization import W4A8Linear, W4Linear, convert_qat_, prepare_qat_
from mgtq.scq.quantize import quantize_from_run
from mgtq.utils import atomic_directory, model_fingerprint, read_json, write_json

FORMAT = "mgtq-quantized-transformer"
FORMAT_VERSION = 1
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEMES = {"w4a16": W4Linear, "w4a8": W4A8Linear}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cast_float_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the float parts (embeddings, norms, convs, biases) — not scales, which stay fp32."""
    for module in model.modules():
        if isinstance(module, (W4Linear, W4A8Linear)):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(dtype)


def export_run(run: str | Path, out: str | Path) -> Path:
    """`mgtq export RUN --out DIR`: the quantized transformer plus the source model's other components."""
    model, manifest = quantize_from_run(run)
    source = Path(manifest["source_model"])
    out = Path(out)
    with atomic_directory(out) as tmp:
        for item in source.iterdir():
            if item.name == "transformer" or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        save_quantized_transformer(model, manifest, tmp / "transformer")
    return out


def save_quantized_transformer(model: MeissonicTransformer, manifest: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (folder / "config.json").write_text(json.dumps({"_class_name": "MeissonicTransformer",
                                                    **plain_config(model.config)}, indent=2))
    write_json(folder / "manifest.json", manifest)


def load_quantized_transformer(folder: str | Path, torch_dtype: torch.dtype | None = None) -> MeissonicTransformer:
    """Build the transformer on the meta device, swap in the quantized modules, load the tensors."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} holds format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this mgtq "
            f"reads {FORMAT!r} version {FORMAT_VERSION}. Upgrade mgtq or re-export the checkpoint.")
    config = {k: v for k, v in read_json(folder / "config.json").items() if not k.startswith("_")}
    with init_empty_weights():
        model = MeissonicTransformer(**config)
    for name, layer in manifest["layers"].items():
        scheme = layer["scheme"]
        if scheme not in SCHEMES:
            raise ValueError(f"layer {name}: unknown scheme {scheme!r} in {folder / 'manifest.json'}")
        linear = model.get_submodule(name)
        group = layer["group_size"] if scheme == "w4a16" else None
        new = SCHEMES[scheme](linear.in_features, linear.out_features, bias=linear.bias is not None,
                              group_size=group, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{folder / WEIGHTS} is damaged or truncated ({err}); re-export the checkpoint") from err
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{folder / WEIGHTS} does not match its manifest: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise ValueError(f"{folder / WEIGHTS}: {key} has shape {tuple(tensors[key].shape)}, expected "
                             f"{tuple(ref.shape)} — the file was modified; re-export the checkpoint")
    model.load_state_dict(tensors, assign=True, strict=True)
    if torch_dtype is not None:
        _cast_float_tensors(model, torch_dtype)
    model.token_merging = None
    return model.eval()
