"""Where the embedded default model lives: `checkpoints/tiny-shapes` of the repository."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-shapes"


def default_model() -> Path:
    """The embedded default model's folder; FileNotFoundError (saying what to do) if it is absent."""
    if not DEFAULT_MODEL.is_dir():
        raise FileNotFoundError(
            f"the embedded default model is not at {DEFAULT_MODEL}; install mgtq from its repository with "
            "`pip install -e .` or pass --model DIR"
        )
    return DEFAULT_MODEL
