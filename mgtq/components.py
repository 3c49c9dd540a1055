"""Float components (VQ, text encoder, float transformer) are loaded as strictly as quantized ones.

`from_pretrained` fills a missing tensor with a fresh initialization (transformers only warns) or
leaves it on the meta device (diffusers), ignores unexpected ones, and accepts NaN: each gives a
wrong image with exit code 0. `check_loaded` compares the loaded module with its safetensors files
and refuses any of those, naming the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from mgtq.limits import MAX_RESOLUTION
from mgtq.utils import all_finite, describe_path, sha256_file


class BadComponent(ValueError):
    """A component folder that fails mgtq's checks; the message names the file, the key and the fix."""


# A CLIP text tower may be loaded from a whole CLIPModel's weights (the official Meissonic setup loads
# CLIP ViT-H/14 this way): the image tower's tensors are there and are not the text encoder's.
OTHER_TOWER = ("vision_model.", "visual_projection.", "logit_scale")

# config.json keys that count layers (diffusers, transformers): each layer holds at least one tensor.
LAYER_COUNT = re.compile(r"num_\w*layers|num_hidden_layers|layers_per_block|num_\w*blocks")


def check_files(folder: str | Path) -> dict[str, Path]:
    """Check a component folder before `from_pretrained` builds anything from it: its weights files are
    readable, its config.json is a bounded JSON object whose layer counts the weights can hold (a model of
    `num_layers: 10**6` would be allocated before any weight is compared). Returns `stored_keys`."""
    from mgtq.config import read_data

    folder = Path(folder)
    stored = stored_keys(folder)
    config = read_data(folder / "config.json") if (folder / "config.json").exists() else {}
    if not isinstance(config, dict):
        raise BadComponent(f"{folder / 'config.json'} must hold a JSON object, got {type(config).__name__}; fix it")
    check_layer_counts(config, len(stored), folder / "config.json")
    return stored


def check_layer_counts(config: dict, tensors: int, path: Path) -> None:
    """Refuse a config.json (at `path`) whose layer counts exceed the number of stored `tensors`: each layer holds
    at least one, and the model would be allocated before any weight is compared."""
    for key, value in sorted(config.items()):
        if LAYER_COUNT.fullmatch(key) and isinstance(value, int) and value > tensors:
            raise BadComponent(f"{path}: {key} {value} describes more layers than the {tensors} tensors of its "
                               "weights files can hold; fix config.json")


def stored_keys(folder: str | Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} over a component folder's weights files."""
    from safetensors import safe_open

    stored = {}
    for path in weights_files(folder):
        if not path.is_file():  # reading a device (a link to /dev/zero) would never end or say "too small"
            raise BadComponent(f"{path} {describe_path(path)}, not a weights file; replace it by the real file")
        try:
            with safe_open(str(path), framework="pt") as f:
                stored.update(dict.fromkeys(f.keys(), path))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
            raise BadComponent(f"{path} is not a readable safetensors file ({str(err)[:200]}); it may be truncated: "
                               "re-create it") from None
    return stored


# The weights file names diffusers and transformers read (unsharded; sharded ones are listed by an index).
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def weights_files(folder: str | Path) -> list[Path]:
    """The safetensors files `from_pretrained` reads from `folder`: the ones a `*.safetensors.index.json` lists,
    else diffusers' or transformers' single weights file, else every `*.safetensors` (other files, such as a
    user's own tensors beside the weights, are not the model's)."""
    from mgtq.config import read_data

    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        data = read_data(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise BadComponent(f"{index} has no weight_map; fix it or re-create the folder")
        return [folder / name for name in sorted(set(map(str, weight_map.values())))]
    single = [folder / name for name in WEIGHTS_NAMES if (folder / name).exists() or (folder / name).is_symlink()]
    return single[:1] or sorted(folder.glob("*.safetensors"))


def check_loaded(model: torch.nn.Module, folder: str | Path) -> None:
    """Raise ValueError unless `model` holds exactly the tensors of `folder`'s files, all finite."""
    folder = Path(folder)
    what = {"MeissonicTransformer": "transformer", "VQModel": "VQ model"}.get(type(model).__name__, "text encoder")
    stored = stored_keys(folder)
    expected = model.state_dict()
    optional = {name for name, _ in model.named_buffers()}  # e.g. CLIP's position ids: saved by some versions
    missing = sorted(set(expected) - set(stored) - optional)
    if missing:
        raise BadComponent(f"{folder}: the {what}'s weights files lack tensor {missing[0]!r} ({len(missing)} missing "
                           "in all) that its config.json needs; the folder is incomplete: re-create it")
    unexpected = sorted(k for k in set(stored) - set(expected) - optional if not k.startswith(OTHER_TOWER))
    if unexpected:
        raise BadComponent(f"{stored[unexpected[0]]}: tensor {unexpected[0]!r} is not part of the {what} that "
                           f"{folder / 'config.json'} describes ({len(unexpected)} such); fix config.json or re-create "
                           "the folder")
    for name, tensor in expected.items():
        if tensor.is_meta:
            raise BadComponent(f"{stored.get(name, folder)}: tensor {name!r} of the {what} was not loaded; re-create "
                               "the folder")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise BadComponent(f"{stored.get(name, folder)}: tensor {name!r} of the {what} holds NaN or infinite "
                               "values; the weights are damaged: re-create them")


def check_index(index, path: Path) -> None:
    """Refuse a model_index.json that is not a JSON object, or whose mgtq resolution is past the limit.

    Anything else (a list, a number) would be read as an official Meissonic folder with its defaults:
    a 1024 px image from whatever model the folder holds.
    """
    if not isinstance(index, dict):
        raise BadComponent(f"{path} must hold a JSON object (diffusers' model_index), got {type(index).__name__}; "
                           "fix it or re-create the folder")
    settings = index.get("mgtq")
    resolution = settings.get("resolution") if isinstance(settings, dict) else None
    if isinstance(resolution, int) and resolution > MAX_RESOLUTION:
        raise BadComponent(f"{path}: mgtq.resolution {resolution} is past mgtq's limit of {MAX_RESOLUTION} px "
                           "(mgtq.limits); set the model's real resolution")


# ------------------------------------------------------------------------------- pipeline checksums
# model_index.json key of {relative path: sha256} of the files an mgtq writer put beside the transformer (VQ, text
# encoder, tokenizer, scheduler); the transformer's own manifest covers its folder.
CHECKSUMS_KEY = "mgtq_files"
_UNHASHED = ("model_index.json", "transformer")


def pipeline_checksums(root: str | Path) -> dict[str, str]:
    """{path relative to `root`: sha256} of every file of a pipeline folder but model_index.json and transformer/
    (hidden files and folders left out)."""
    root = Path(root)
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in _UNHASHED or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            found[relative.as_posix()] = sha256_file(path)
    return found


def verified_files(root: str | Path, skip: Iterable[str] = ()) -> list[Path]:
    """The files loading `root` hashes: those its quantized transformer's manifest names, then those its
    model_index.json records (the order a load checks them in, so hashing them ahead in that order serves the first
    check first), but the components in `skip` (passed in by the caller), read loosely (the checks that follow judge
    the files and refuse what is wrong in them)."""
    from mgtq.config import read_data

    root, found = Path(root), []
    for listing, folder, key in ((root / "transformer" / "manifest.json", root / "transformer", "files"),
                                 (root / "model_index.json", root, CHECKSUMS_KEY)):
        try:
            names = read_data(listing, fmt="json").get(key) if listing.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(names, dict):
            found += [folder / n for n in names if isinstance(n, str) and _inside(n)]
    skip = set(skip)
    return [p for p in found if p.relative_to(root).parts[0] not in skip]


def _inside(name: str) -> bool:
    """Whether a recorded relative path names a file inside its folder (not the folder, nothing above it)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def check_checksums(index: dict, root: str | Path, provided: Iterable[str] = ()) -> None:
    """Refuse a pipeline folder whose files differ from the checksums its model_index.json records (an mgtq
    writer's); a folder without them (an official one) is not checked. Components the caller passes in its place
    (`provided`: "text_encoder", …) and component folders that are gone are left to the loader, which uses the
    given one or names what to pass (a CLIP shared by several checkpoints is a common set-up)."""
    root = Path(root)
    recorded = index.get(CHECKSUMS_KEY)
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in recorded.items()):
        raise BadComponent(f"{root / 'model_index.json'}: {CHECKSUMS_KEY} must map file paths to sha256 digests; "
                           "re-create the folder")
    for name, digest in sorted(recorded.items()):
        path = root / name
        if not _inside(name):
            raise BadComponent(f"{root / 'model_index.json'}: {CHECKSUMS_KEY} names {name!r}, not a file inside the "
                               "folder; re-create the folder")
        component = Path(name).parts[0]
        if component in provided or (len(Path(name).parts) > 1 and not (root / component).exists()):
            continue
        if not path.is_file():
            raise BadComponent(f"{path} {describe_path(path)}, but the folder's model_index.json records it; "
                               "the checkpoint is incomplete: re-create it")
        if sha256_file(path) != digest:
            raise BadComponent(f"{path}: sha256 differs from the one model_index.json records: the file was "
                               "modified or damaged; re-create the checkpoint")
