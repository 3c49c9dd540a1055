"""Strict, typed loading of config dataclasses from mappings (YAML, JSON, CLI).

One owner for what every mgtq config does when it is read from a file: an unknown or misspelled key
is an error that names it, every value is checked against the field's annotation before the
dataclass's own ``__post_init__`` checks its range, and every message names the full key::

    @dataclass(frozen=True)
    class QATConfig:
        steps: int = 300
        lr: float = 1e-4

    from_mapping(QATConfig, {"steps": "many"}, "qat")
    # ValueError: qat.steps must be an integer, got 'many'

Supported annotations: ``int``, ``float`` (finite; in a mapping, a numeric string such as YAML's ``1e-4`` is
read as a number), ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``list[X]``, ``dict[str, X]`` and nested dataclasses (a mapping, recursed into). Anything else is
passed through unchecked, to be validated by the dataclass itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import stat
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["from_mapping", "validate", "check_keys", "check_value", "read_data", "read_mapping", "MAX_DEPTH",
           "MAX_BYTES"]

# mgtq's own JSON/YAML files (configs, manifests, recipes, run records, results) nest a few levels and
# weigh kilobytes; these bounds stop a hostile or damaged file before a parser recurses or allocates.
MAX_DEPTH = 32
MAX_BYTES = 64 << 20


def read_data(path: str | os.PathLike, label: str | None = None, fmt: str | None = None) -> Any:
    """The JSON or YAML data in `path` (format from `fmt`, else the suffix: .json is JSON, else YAML).

    The one reader of mgtq's settings files. Every failure is a ValueError (FileNotFoundError for a
    missing file) naming the file as `label` (default: its path): not a regular file, larger than
    MAX_BYTES, not UTF-8, not valid JSON/YAML, or nested deeper than MAX_DEPTH.
    """
    path = Path(path)
    label = label or str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{label} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{label} is {'a folder' if stat.S_ISDIR(info.st_mode) else 'not a regular file'}; "
                         "give the path of a file")
    if info.st_size > MAX_BYTES:
        raise ValueError(f"{label} is {info.st_size} bytes, more than the {MAX_BYTES >> 20} MiB a settings file may "
                         "have; it is not an mgtq file")
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{label} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    fmt = fmt or ("json" if path.suffix.lower() == ".json" else "yaml")
    try:
        data = _parse(text, fmt, label)
    except RecursionError:  # the parsers recurse per level: a deep file ends here, quickly
        raise _too_deep(label) from None
    _check_depth(data, label)
    return data


def read_mapping(path: str | os.PathLike, label: str | None = None, fmt: str | None = None) -> dict:
    """The mapping at the top of a JSON/YAML settings file (:func:`read_data`); an empty file is ``{}``.

    Anything else at the top (a list, a number, a string) is a ValueError naming the file as `label`.
    """
    data = read_data(path, label, fmt)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{label or str(path)} must hold a mapping of settings (key: value), got {type(data).__name__}")
    return dict(data)


def _parse(text: str, fmt: str, label: str) -> Any:
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{label} is not valid JSON: {err}; it may be truncated: recreate it") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{label} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None


def _check_depth(data: Any, label: str) -> None:
    """Refuse data nested deeper than MAX_DEPTH (checked without recursion: it is what recursion fears)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    raise _too_deep(label)
                stack.append((child, depth + 1))


def _too_deep(label: str) -> ValueError:
    return ValueError(f"{label} nests deeper than {MAX_DEPTH} levels; mgtq's files never do: it is damaged or not an "
                      "mgtq file")


def check_keys(cls, data: Mapping, where: str = "") -> None:
    """Raise ValueError naming the first unknown key of `data` for dataclass `cls`."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = ", ".join(repr(_join(where, str(k))) for k in unknown)
        raise ValueError(f"unknown key {names}; known keys{' of ' + where if where else ''}: {known}")


def from_mapping(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from `data` (a mapping or an instance), checking keys and types.

    `where` is the dotted name of this section in messages ("qat", "sampler.noise"). Range checks
    stay in the dataclass's ``__post_init__``; a TypeError or ValueError raised there is re-raised as
    a ValueError that names the section.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__} must be a mapping of {sorted(f.name for f in dataclasses.fields(cls))}, "
                         f"got {_show(data)}")
    check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    kwargs = {name: check_value(value, hints[name], _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad value in {where or cls.__name__}: {err}") from err


def validate(config, where: str = "") -> None:
    """Check every field of the frozen dataclass `config` against its annotation, normalizing in place.

    The one field check of mgtq's config dataclasses: call it first in ``__post_init__`` so a config
    built in Python is held to the same rules as one read from a file (lists become tuples, ints
    become floats, a nested section given as a mapping is built with :func:`from_mapping`). Range and
    cross-field checks follow it in the ``__post_init__``. Messages name the dotted key. A value passed
    in Python is held to its type (``ratio="0.5"`` is an error); only a mapping, i.e. file data, may
    quote a number.
    """
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = check_value(getattr(config, f.name), hints[f.name], _join(where, f.name), text_numbers=False)
        object.__setattr__(config, f.name, value)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_value(value: Any, annotation: Any, name: str, text_numbers: bool = True) -> Any:
    """`value` checked against (and lightly normalized to) `annotation`; ValueError names `name`.

    text_numbers: a numeric string is a number (file data: YAML 1.1 reads ``1e-4`` as a string).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{name} must be set, got null")
        errors = []
        for option in options:
            try:
                return check_value(value, option, name, text_numbers)
            except ValueError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ValueError(f"{name} has an invalid value {_show(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {list(args)}, got {_show(value)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {_show(value)}")
        return value
    if annotation is int:
        value = plain_scalar(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {_show(value)}")
        return value
    if annotation is float:
        return _finite(value, name, text_numbers)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {_show(value)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{name} must have {len(args)} entries, got {len(value)}")
            items = [check_value(v, a, f"{name}[{i}]", text_numbers) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [check_value(v, item, f"{name}[{i}]", text_numbers) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping, got {_show(value)}")
        key_type, value_type = args if args else (Any, Any)
        return {check_value(k, key_type, f"{name} key", text_numbers): check_value(v, value_type, f"{name}.{k}",
                                                                                   text_numbers)
                for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, name)
    return value


def _finite(value: Any, name: str, text_numbers: bool = True) -> float:
    if isinstance(value, str) and text_numbers:  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {_show(value)}") from None
    value = plain_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def plain_config(config) -> dict:
    """The constructor arguments of a diffusers model's config (no bookkeeping keys such as `_class_name`; tuples as
    lists), as its config.json holds them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def plain_scalar(value: Any) -> Any:
    """A numpy scalar (np.int64, np.float32, np.bool_) or a 0-d torch tensor as the Python value it holds (what
    users pass from arrays and tensors, e.g. ``strength=np.float32(0.5)``); anything else as it is."""
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")  # neither is imported here for this
    if numpy is not None and isinstance(value, numpy.generic):
        return value.item()
    if torch is not None and isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_meta:
        return value.item()
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
