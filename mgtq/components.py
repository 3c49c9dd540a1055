"""Float components (VQ, text encoder, float transformer) are loaded as strictly as quantized ones.

`from_pretrained` fills a missing tensor with a fresh initialization (transformers only warns) or
leaves it on the meta device (diffusers), ignores unexpected ones, and accepts NaN: each gives a
wrong image with exit code 0. `check_loaded` compares the loaded module with its safetensors files
and refuses any of those, naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path

import torch

# A CLIP text tower may be loaded from a whole CLIPModel's weights (the official Meissonic setup loads
# CLIP ViT-H/14 this way): the image tower's tensors are there and are not the text encoder's.
OTHER_TOWER = ("vision_model.", "visual_projection.", "logit_scale")


def stored_keys(folder: str | Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} over a component folder's weights files."""
    from safetensors import safe_open

    stored = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                stored.update(dict.fromkeys(f.keys(), path))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
            raise ValueError(f"{path} is not a readable safetensors file ({str(err)[:200]}); it may be truncated: "
                             "re-create it") from None
    return stored


def check_loaded(model: torch.nn.Module, folder: str | Path) -> None:
    """Raise ValueError unless `model` holds exactly the tensors of `folder`'s files, all finite."""
    folder = Path(folder)
    what = {"MeissonicTransformer": "transformer", "VQModel": "VQ model"}.get(type(model).__name__, "text encoder")
    stored = stored_keys(folder)
    expected = model.state_dict()
    optional = {name for name, _ in model.named_buffers()}  # e.g. CLIP's position ids: saved by some versions
    missing = sorted(set(expected) - set(stored) - optional)
    if missing:
        raise ValueError(f"{folder}: the {what}'s weights files lack tensor {missing[0]!r} ({len(missing)} missing in "
                         "all) that its config.json needs; the folder is incomplete: re-create it")
    unexpected = sorted(k for k in set(stored) - set(expected) - optional if not k.startswith(OTHER_TOWER))
    if unexpected:
        raise ValueError(f"{stored[unexpected[0]]}: tensor {unexpected[0]!r} is not part of the {what} that "
                         f"{folder / 'config.json'} describes ({len(unexpected)} such); fix config.json or re-create "
                         "the folder")
    for name, tensor in expected.items():
        if tensor.is_meta:
            raise ValueError(f"{stored.get(name, folder)}: tensor {name!r} of the {what} was not loaded; re-create "
                             "the folder")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{stored.get(name, folder)}: tensor {name!r} of the {what} holds NaN or infinite "
                             "values; the weights are damaged: re-create them")
