"""Where the embedded default model lives: mgtq/_embedded/ in an installed wheel (setup.py copies it
there), else `checkpoints/tiny-shapes` of the repository (a source checkout or an editable install)."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_embedded"
_REPOSITORY = Path(__file__).resolve().parent.parent


def _first_existing(*candidates: Path) -> Path:
    return next((p for p in candidates if p.exists()), candidates[-1])


DEFAULT_MODEL = _first_existing(_PACKAGED / "tiny-shapes", _REPOSITORY / "checkpoints" / "tiny-shapes")
DEFAULT_RECIPE = _first_existing(_PACKAGED / "recipes" / "tiny-shapes-w4a8-scq.yaml",
                                 _REPOSITORY / "recipes" / "tiny-shapes-w4a8-scq.yaml")


def default_model() -> Path:
    """The embedded default model's folder; FileNotFoundError (saying what to do) if it is absent."""
    if not DEFAULT_MODEL.is_dir():
        raise FileNotFoundError(
            f"the embedded default model is not at {DEFAULT_MODEL}; reinstall mgtq from a wheel built from its "
            "repository (`pip install .`), or pass --model DIR"
        )
    return DEFAULT_MODEL
