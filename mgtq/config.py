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

Supported annotations: ``int``, ``float`` (finite; a numeric string such as YAML's ``1e-4`` is read as
a number), ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``list[X]``, ``dict[str, X]`` and nested dataclasses (a mapping, recursed into). Anything else is
passed through unchecked, to be validated by the dataclass itself.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["from_mapping", "check_keys", "check_value"]


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


def check_value(value: Any, annotation: Any, name: str) -> Any:
    """`value` checked against (and lightly normalized to) `annotation`; ValueError names `name`."""
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
                return check_value(value, option, name)
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
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {_show(value)}")
        return value
    if annotation is float:
        return _finite(value, name)
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
            items = [check_value(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [check_value(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping, got {_show(value)}")
        key_type, value_type = args if args else (Any, Any)
        return {check_value(k, key_type, f"{name} key"): check_value(v, value_type, f"{name}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, name)
    return value


def _finite(value: Any, name: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
