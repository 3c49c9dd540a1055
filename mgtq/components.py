"""Float components (VQ, text encoder, float transformer) are loaded as strictly as quantized ones.

`from_pretrained` fills a missing tensor with a fresh initialization (transformers only warns) or
leaves it on the meta device (diffusers), ignores unexpected ones, and accepts NaN: each gives a
wrong image with exit code 0. `check_loaded` compares the loaded module with its safetensors files
and refuses any of those, naming the file and the key.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path, PureWindowsPath

import torch

from mgtq.files import describe_path
from mgtq.finite import all_finite
from mgtq.hashing import sha256_file
from mgtq.limits import MAX_RESOLUTION


class BadComponent(ValueError):
    """A component folder that fails mgtq's checks; the message names the file, the key and the fix."""


# A CLIP text tower may be loaded from a whole CLIPModel's weights (the official Meissonic setup loads
# CLIP ViT-H/14 this way): the image tower's tensors are there and are not the text encoder's.
OTHER_TOWER = ("vision_model.", "visual_projection.", "logit_scale")

# config.json keys that count layers (diffusers, transformers): each layer holds at least one tensor.
LAYER_COUNT = re.compile(r"num_\w*layers|num_hidden_layers|layers_per_block|num_\w*blocks")


def check_files(folder: str | Path, variant: str | None = None) -> dict[str, Path]:
    """Check a component folder before `from_pretrained` builds anything from it: its weights files (of
    `variant`, as diffusers names them) are readable, its config.json is a bounded JSON object whose layer counts
    the weights can hold (a model of `num_layers: 10**6` would be allocated before any weight is compared).
    Returns `stored_keys`."""
    from mgtq.config import read_data

    folder = Path(folder)
    if not weights_files(folder, variant):  # else the config's layer counts would be blamed for the missing weights
        found = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        variants = [name for name in found if _VARIANT_FILE.fullmatch(name)]
        if variants and variant is None:
            raise BadComponent(f"{folder} holds a variant's weights only ({variants}): save it again without a "
                               "variant (only MeissonicTransformer.from_pretrained takes variant=)")
        of = "" if variant is None else f" of variant {variant!r}"
        raise BadComponent(f"{folder} has no .safetensors weights{of} (found {found}); mgtq loads safetensors only, "
                           "never pickle files: convert the weights to safetensors")
    stored = stored_keys(folder, variant)
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


def stored_keys(folder: str | Path, variant: str | None = None) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} over a component folder's weights files."""
    return {key: path for path, header in stored_headers(folder, variant) for key in header}


def stored_headers(folder: str | Path, variant: str | None = None) -> list[tuple[Path, dict[str, str]]]:
    """(file, {tensor name: safetensors dtype name, "F32", "BF16", "I8", …}) for each weights file of a component
    folder, from the headers alone; a damaged file is named in one line."""
    from safetensors import safe_open

    headers = []
    for path in weights_files(folder, variant):
        if not path.is_file():  # reading a device (a link to /dev/zero) would never end or say "too small"
            raise BadComponent(f"{path} {describe_path(path)}, not a weights file; replace it by the real file")
        try:
            with safe_open(str(path), framework="pt") as f:
                headers.append((path, {key: f.get_slice(key).get_dtype() for key in f.keys()}))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
            raise BadComponent(f"{path} is not a readable safetensors file ({str(err)[:200]}); it may be truncated: "
                               "re-create it") from None
    return headers


# The weights file names diffusers and transformers read (unsharded; sharded ones are listed by an index).
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def weights_files(folder: str | Path, variant: str | None = None) -> list[Path]:
    """The safetensors files `from_pretrained` reads from `folder`: the ones a `*.safetensors.index.json` lists,
    else diffusers' or transformers' single weights file, else every `*.safetensors` (other files, such as a
    user's own tensors beside the weights, are not the model's). With a `variant` ("fp16"), the files of that
    name as diffusers forms it: `*.safetensors.index.fp16.json`, `diffusion_pytorch_model.fp16.safetensors`."""
    folder = Path(folder)
    tag = "" if variant is None else f".{variant}"
    for index in sorted(folder.glob(f"*.safetensors.index{tag}.json")):
        return _indexed_files(index)
    names = [name.replace(".safetensors", f"{tag}.safetensors") for name in WEIGHTS_NAMES]
    single = [folder / name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    others = [p for p in sorted(folder.glob("*.safetensors")) if not _VARIANT_FILE.fullmatch(p.name)]
    return single[:1] or ([] if variant else others)


# diffusers' and transformers' weights of a variant (`diffusion_pytorch_model.fp16.safetensors`): read only when
# that variant is asked for
_VARIANT_FILE = re.compile(r"(diffusion_pytorch_model|model)\.[^.]+\.safetensors")


def _indexed_files(index: Path) -> list[Path]:
    """The weights files a sharded checkpoint's index lists."""
    from mgtq.config import read_data

    data = read_data(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise BadComponent(f"{index} has no weight_map; fix it or re-create the folder")
    return [index.parent / name for name in sorted(set(map(str, weight_map.values())))]


def check_loaded(model: torch.nn.Module, folder: str | Path, variant: str | None = None) -> None:
    """Raise ValueError unless `model` holds exactly the tensors of `folder`'s files (of `variant`), all finite."""
    folder = Path(folder)
    what = {"MeissonicTransformer": "transformer", "VQModel": "VQ model"}.get(type(model).__name__, "text encoder")
    headers = stored_headers(folder, variant)
    stored = {key: path for path, header in headers for key in header}
    floats = {key for _, header in headers for key, dtype in header.items() if dtype in SAFETENSORS_FLOATS}
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
        if tensor.is_floating_point() and name in stored and name not in floats:
            raise BadComponent(f"{stored[name]}: tensor {name!r} of the {what} is stored as an integer or bool type, "
                               "but the model's is floating point; the file was altered: re-create it")
        if tensor.is_meta:
            raise BadComponent(f"{stored.get(name, folder)}: tensor {name!r} of the {what} was not loaded; re-create "
                               "the folder")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise BadComponent(f"{stored.get(name, folder)}: tensor {name!r} of the {what} holds NaN or infinite "
                               "values; the weights are damaged: re-create them")


# The floating-point types a safetensors header names, and the torch dtype of each.
SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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
# model_index.json key of {relative path: sha256} of every file an mgtq writer put in a pipeline folder (a quantized
# transformer by its manifest.json, which holds its files' digests), and, under SETTINGS_ENTRY, the digest of the
# folder's "mgtq" settings (the sampler and timestep convention its images depend on).
CHECKSUMS_KEY = "mgtq_files"
SETTINGS_ENTRY = "model_index.json#mgtq"
PIPELINE_COMPONENTS = ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler")  # the folders a load reads
_MANIFEST = "manifest.json"  # mgtq.quantization.checkpoint.MANIFEST (not imported: that module imports this one)


def settings_digest(settings) -> str:
    """sha256 of a folder's "mgtq" settings as JSON with sorted keys (what model_index.json holds)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _recorded_files(root: Path, components: Iterable[str] | None = None) -> list[Path]:
    """The files of a pipeline folder its checksums cover: all but model_index.json and hidden ones, and of a
    quantized transformer/ only its manifest (whose checks cover the files it loads); with `components`, those of
    these component folders only. A component folder that is a link (a shared CLIP) is walked like a folder."""
    quantized = (root / "transformer" / _MANIFEST).is_file()
    tops = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.name != "model_index.json")
    if components is not None:
        tops = [p for p in tops if p.name in set(components)]
    found = []
    for top in tops:
        if top.is_file():
            found.append(top)
        elif top.is_dir():  # rglob does not descend into links: start it at the folder itself
            for path in sorted(top.rglob("*")):
                relative = path.relative_to(root)
                if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                    continue
                if quantized and relative.parts[0] == "transformer" and relative.parts[1:] != (_MANIFEST,):
                    continue
                found.append(path)
    return found


def pipeline_checksums(root: str | Path, settings=None) -> dict[str, str]:
    """{path relative to `root`: sha256} of the files `_recorded_files` names, and the digest of `settings` (the
    "mgtq" entry the writer puts in model_index.json) under SETTINGS_ENTRY."""
    root = Path(root)
    found = {path.relative_to(root).as_posix(): sha256_file(path) for path in _recorded_files(root)}
    if settings is not None:
        found[SETTINGS_ENTRY] = settings_digest(settings)
    return found


def record_settings(index: dict) -> dict:
    """`index` (a model_index.json's content) with its recorded settings digest brought up to date: for the one
    sanctioned edit of a written folder, a new default sampler (`mgtq.pipeline.set_default_sampler`)."""
    recorded = index.get(CHECKSUMS_KEY)
    # only a record that covers the settings: an earlier mgtq's (no transformer files) must not pass for a current one
    if isinstance(recorded, dict) and SETTINGS_ENTRY in recorded and "mgtq" in index:
        return {**index, CHECKSUMS_KEY: {**recorded, SETTINGS_ENTRY: settings_digest(index["mgtq"])}}
    return index


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
            found += [folder / n for n in names if isinstance(n, str) and n != SETTINGS_ENTRY and _inside(n)]
    skip = set(skip)
    return [p for p in dict.fromkeys(found) if p.relative_to(root).parts[0] not in skip]


def _inside(name: str) -> bool:
    """Whether a recorded relative path names a file inside its folder (not the folder, nothing above it), read as
    a path of this system and as a Windows one: there "C:x" (drive-relative) and "\\x" (rooted) are not absolute,
    yet leave the folder, and a backslash separates."""
    parts, windows = Path(name).parts, PureWindowsPath(name)
    return (bool(parts) and not Path(name).is_absolute() and ".." not in parts
            and not windows.anchor and ".." not in windows.parts)


def check_checksums(index: dict, root: str | Path, provided: Iterable[str] = ()) -> None:
    """Refuse a pipeline folder whose files or settings differ from the checksums its model_index.json records (an
    mgtq writer's), or that holds a file its checksums do not cover in a component folder they cover; a folder
    without them (an official one) is not checked, and one an mgtq writer made before they covered the settings and
    the transformer is checked as far as they go, with a warning. Components the caller passes in its place
    (`provided`: "text_encoder", …) and component folders that are gone are left to the loader, which uses the
    given one or names what to pass (a CLIP shared by several checkpoints is a common set-up)."""
    root = Path(root)
    where = root / "model_index.json"
    recorded = index.get(CHECKSUMS_KEY)
    if recorded is None:
        if "mgtq" in index or (root / "transformer" / _MANIFEST).is_file():
            warnings.warn(f"{where} records no checksums ({CHECKSUMS_KEY}), so its files are not verified; a folder "
                          "mgtq writes has them: once you trust this one, re-save it (mgtq.load(...).save_pretrained)",
                          stacklevel=3)
        return
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in recorded.items()):
        raise BadComponent(f"{where}: {CHECKSUMS_KEY} must map file paths to sha256 digests; re-create the folder")
    files = {k: v for k, v in recorded.items() if k != SETTINGS_ENTRY}
    for name in sorted(files):
        if not _inside(name):
            raise BadComponent(f"{where}: {CHECKSUMS_KEY} names {name!r}, not a file inside the folder; re-create "
                               "the folder")
    if SETTINGS_ENTRY in recorded:
        _check_settings(index, recorded[SETTINGS_ENTRY], where)
    else:
        warnings.warn(f"{where}: an earlier mgtq recorded these checksums; they cover neither the transformer nor the "
                      "sampler settings: re-save the folder (mgtq.load(...).save_pretrained) to record them",
                      stacklevel=3)
    for name, digest in sorted(files.items()):
        path = root / name
        component = Path(name).parts[0]
        if component in provided or (len(Path(name).parts) > 1 and not (root / component).exists()):
            continue
        if not path.is_file():
            raise BadComponent(f"{path} {describe_path(path)}, but the folder's model_index.json records it; "
                               "the checkpoint is incomplete: re-create it")
        if sha256_file(path) != digest:
            raise BadComponent(f"{path}: sha256 differs from the one model_index.json records: the file was "
                               "modified or damaged; re-create the checkpoint")
    if SETTINGS_ENTRY in recorded:
        _check_covered(root, files, set(provided))


def check_recorded(folder: str | Path) -> None:
    """A component folder loaded on its own (`MeissonicTransformer.from_pretrained(DIR/"transformer")`, the VQ):
    when the pipeline folder around it records checksums, its files are held to them as a whole load holds them."""
    from mgtq.config import read_data

    folder = Path(folder).resolve()
    index_path = folder.parent / "model_index.json"
    if folder.name not in PIPELINE_COMPONENTS or not index_path.is_file():
        return
    index = read_data(index_path, fmt="json")
    recorded = index.get(CHECKSUMS_KEY) if isinstance(index, dict) else None
    if isinstance(recorded, dict) and SETTINGS_ENTRY in recorded:  # an earlier writer's: the whole load warns
        check_checksums(index, folder.parent, provided=set(PIPELINE_COMPONENTS) - {folder.name})


def check_recorded_settings(index: dict, where: Path) -> None:
    """Refuse settings that differ from the digest `index` records (where it records one): before a writer builds
    on them (`set_default_sampler` would otherwise record a hand edit as the folder's own)."""
    recorded = index.get(CHECKSUMS_KEY)
    if isinstance(recorded, dict) and isinstance(recorded.get(SETTINGS_ENTRY), str):
        _check_settings(index, recorded[SETTINGS_ENTRY], where)


def _check_settings(index: dict, digest: str, where: Path) -> None:
    if "mgtq" not in index:
        raise BadComponent(f"{where} lost its 'mgtq' settings (resolution, sampler), which its {CHECKSUMS_KEY} "
                           "record; restore the file or re-create the folder")
    if settings_digest(index["mgtq"]) != digest:
        raise BadComponent(f"{where}: the 'mgtq' settings differ from the ones recorded when it was written (edited "
                           "by hand?); restore the file (mgtq.pipeline.set_default_sampler changes the default "
                           "sampler of an intact folder and records it)")


def _check_covered(root: Path, files: dict[str, str], provided: set[str]) -> None:
    """Every file a loader may read from the pipeline's component folders is one the checksums record: a file
    added (a pickle beside the weights, a second weights file, another transformer) or whose entry was dropped is
    refused. Only those folders are listed (not a user's folders beside them)."""
    covered = set(PIPELINE_COMPONENTS) - provided
    for path in _recorded_files(root, covered):
        relative = path.relative_to(root)
        if len(relative.parts) > 1 and relative.as_posix() not in files:
            raise BadComponent(f"{path} is not among the files {root / 'model_index.json'} records: the folder was "
                               "changed after it was written; move the file out of the component folder, or "
                               "re-create the checkpoint")
