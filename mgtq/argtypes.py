"""Argparse types of the `mgtq` flags: each value is checked when the command line is read.

One home for what a flag accepts, so a bad value is a one-line error naming the flag and what is
allowed (argparse prefixes "argument --FLAG:") before anything is loaded or computed:

    p.add_argument("--steps", type=integer(minimum=1))     # "must be an integer ≥ 1, got '0'"
    p.add_argument("--cfg", type=number(minimum=0))        # NaN and ±inf are never numbers here

The ranges match the dataclasses the values end in (SamplerConfig, TomeConfig, MeasureSettings),
which check them again for Python callers.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

__all__ = ["finite_float", "number", "integer", "seed", "ratio", "existing_folder", "existing_file",
           "comma_list", "device"]

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit seeds


def finite_float(text: str) -> float:
    """A finite number: 'nan', 'inf' and '-inf' are refused (float() would accept them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def number(minimum: float | None = None, maximum: float | None = None, *, above: bool = False,
           below: bool = False) -> Callable[[str], float]:
    """A finite number in [minimum, maximum]; `above`/`below` make that end open (> minimum, < maximum)."""
    allowed = _range_text("a finite number", minimum, maximum, above, below)

    def parse(text: str) -> float:
        try:
            value = finite_float(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not _in_range(value, minimum, maximum, above, below):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def integer(minimum: int | None = None, maximum: int | None = None, *,
            parity: Literal["even", "odd"] | None = None) -> Callable[[str], int]:
    """A whole number in [minimum, maximum] ('2.5' and '1e3' are refused, not truncated); `parity`: only even
    or only odd ones (an int4 group size, a window side)."""
    allowed = _range_text(f"an {parity} integer" if parity else "an integer", minimum, maximum, False, False)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not _in_range(value, minimum, maximum, False, False) or (parity and value % 2 != (parity == "odd")):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def existing_folder(what: str) -> Callable[[str], Path]:
    """A path that must be an existing folder (e.g. a pipeline); a file is named as such."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_dir():
            return path
        if path.exists():
            raise argparse.ArgumentTypeError(f"{text!r} is a file, not a {what} folder; pass the folder")
        raise argparse.ArgumentTypeError(
            f"{what} folder {text!r} does not exist; mgtq reads local folders only, it downloads nothing")

    parse.__name__ = "folder"
    return parse


def pipeline_folder(text: str) -> Path:
    """A pipeline folder, or the name of an embedded model (mgtq.default_model.EMBEDDED_MODELS)."""
    from mgtq.default_model import model_folder

    try:
        return model_folder(text)
    except FileNotFoundError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


pipeline_folder.__name__ = "folder"


def existing_file(what: str) -> Callable[[str], Path]:
    """A path that must be an existing file (e.g. a recipe); a folder is named as such."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_file():
            return path
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a {what} file")
        if path.exists():  # /dev/null, a FIFO: not a regular file mgtq reads
            raise argparse.ArgumentTypeError(f"{what} file {text!r} is not a regular file (a device, FIFO or socket)")
        raise argparse.ArgumentTypeError(f"{what} file {text!r} does not exist")

    parse.__name__ = "file"
    return parse


def comma_list(item: Callable[[str], object]) -> Callable[[str], tuple]:
    """'a,b,c' → (item('a'), item('b'), item('c')); an empty list is refused."""

    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
        try:
            return tuple(item(p) for p in parts)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"each entry {err}") from None

    parse.__name__ = "list"
    return parse


def device(text: str) -> str:
    """A torch device that exists on this machine: 'cpu', 'cuda', 'cuda:N', … (checked now, not mid-run)."""
    import torch  # only when --device is given: `mgtq --help` stays fast

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine "
                                             f"(torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), "
                                             f"cuda:0 … cuda:{count - 1}")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, NotImplementedError):
            raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine; use cpu or cuda") \
                from None
    return text


def _in_range(value, minimum, maximum, above: bool, below: bool) -> bool:
    if minimum is not None and (value <= minimum if above else value < minimum):
        return False
    return maximum is None or (value < maximum if below else value <= maximum)


def _range_text(kind: str, minimum, maximum, above: bool, below: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} in {'(' if above else '['}{_show(minimum)}, {_show(maximum)}{')' if below else ']'}"
    if minimum is not None:
        return f"{kind} {'>' if above else '≥'} {_show(minimum)}"
    if maximum is not None:
        return f"{kind} {'<' if below else '≤'} {_show(maximum)}"
    return kind


def _show(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


# Image i of a call uses seed + i: the largest seed leaves room for 2**20 of them under SEED_LIMIT.
SEED_ROOM = 2**20
seed = integer(0, SEED_LIMIT - SEED_ROOM)
# TomeMGT: the fraction of a block's image tokens merged away (mgtq.merging.TomeConfig.ratio).
ratio = number(0, 1, below=True)
