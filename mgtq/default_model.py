"""Where the embedded models live: mgtq/_embedded/ in an installed wheel (setup.py copies them there),
else `checkpoints/` of the repository (a source checkout or an editable install).

Two are embedded, both trained on the shapes world with the same VQ and text encoder: `tiny-shapes`,
the default (Meissonic-1024's layout: 2×2 feature compression, an 8×8 transformer grid), and
`tiny-shapes-16x16` (Meissonic's 512 px layout: no compression, 16×16 = 256 image tokens per block).
Wherever mgtq takes a pipeline folder (`--model`, a recipe's `model:`, `mgtq.load`) it also takes
one of these names when no folder of that name exists. The shipped SCQ recipes (`recipes/*.yaml`, in a wheel
`mgtq/_embedded/recipes/`) are taken by name the same way (`--recipe tiny-shapes-16x16-w4a8-scq`).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_embedded"
_REPOSITORY = Path(__file__).resolve().parent.parent

EMBEDDED_MODELS = ("tiny-shapes", "tiny-shapes-16x16")


def _first_existing(*candidates: Path) -> Path:
    return next((p for p in candidates if p.exists()), candidates[-1])


DEFAULT_MODEL = _first_existing(_PACKAGED / "tiny-shapes", _REPOSITORY / "checkpoints" / "tiny-shapes")
RECIPES = _first_existing(_PACKAGED / "recipes", _REPOSITORY / "recipes")
DEFAULT_RECIPE = RECIPES / "tiny-shapes-w4a8-scq.yaml"


def embedded_model(name: str = "tiny-shapes") -> Path:
    """An embedded model's folder; FileNotFoundError (saying what to do) if the name is unknown or the
    folder is absent."""
    if name not in EMBEDDED_MODELS:
        raise FileNotFoundError(f"no embedded model {name!r}; the embedded models are {', '.join(EMBEDDED_MODELS)}")
    path = _first_existing(_PACKAGED / name, _REPOSITORY / "checkpoints" / name)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model {name} is not at {path}; reinstall mgtq from a wheel built from its "
            "repository (`pip install .`), or pass --model DIR"
        )
    return path


def default_model() -> Path:
    """The embedded default model's folder (`tiny-shapes`)."""
    return embedded_model("tiny-shapes")


def model_folder(name: str | Path) -> Path:
    """A pipeline folder, or the name of an embedded model when no such folder exists → its folder."""
    path = Path(name)
    if path.is_dir():
        return path
    if str(name) in EMBEDDED_MODELS:
        return embedded_model(str(name))
    if path.exists():
        raise FileNotFoundError(f"{str(name)!r} is a file, not a pipeline folder; pass the folder")
    raise FileNotFoundError(
        f"pipeline folder {str(name)!r} does not exist and is not an embedded model ({', '.join(EMBEDDED_MODELS)}); "
        "mgtq reads local folders only, it downloads nothing"
    )


def shipped_recipes() -> list[str]:
    """Names of the SCQ recipes mgtq ships (file stems of `RECIPES/*.yaml`)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_file(name: str | Path) -> Path:
    """A recipe file, or the name of a shipped recipe (with or without `.yaml`) when no such file exists → its
    file. FileNotFoundError naming the shipped recipes otherwise."""
    path = Path(name)
    if path.exists():
        return path
    stem = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if str(name) in (stem, f"{stem}.yaml") and stem in shipped_recipes():
        return RECIPES / f"{stem}.yaml"
    raise FileNotFoundError(
        f"recipe {str(name)!r} is neither a file nor a shipped recipe ({', '.join(shipped_recipes())}); pass a "
        f"recipe YAML file (copy a shipped one from {RECIPES} and edit it)"
    )
