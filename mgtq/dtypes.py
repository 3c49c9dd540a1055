"""Dtype names: the one spelling table for every place a float dtype is named (CLI flags, recipes, manifests,
bench formats): the canonical names (`FloatDtype`, `DTYPE_NAMES`, `dtype_name`), the CLI's short ones
(`SHORT_DTYPES`) and `parse_dtype`, which turns either (or a torch dtype a model computes in) into a torch dtype."""

from __future__ import annotations

from typing import Literal, get_args

import torch


# One spelling table for every place a dtype is named (CLI flags, recipes, manifests, bench formats).
# The canonical names, as a config annotation (recipes, manifests), and the short ones the CLI's --dtype offers:
# the same three dtypes, in the same order.
FloatDtype = Literal["float32", "bfloat16", "float16"]
ShortDtype = Literal["fp32", "bf16", "fp16"]
SHORT_DTYPES = get_args(ShortDtype)
DTYPES: dict[str, torch.dtype] = {name: dtype for names in (get_args(FloatDtype), SHORT_DTYPES)
                                  for name, dtype in zip(names, (torch.float32, torch.bfloat16, torch.float16))}
DTYPE_NAMES: dict[torch.dtype, str] = {DTYPES[name]: name for name in get_args(FloatDtype)}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from a name ("bf16", "bfloat16", …) or a torch floating dtype a model can compute in; None stays
    None; errors list the choices. fp8 dtypes are storage-only (diffusers' `enable_layerwise_casting`)."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if not name.is_floating_point or name.itemsize < 2:
            raise ValueError(f"dtype {name} is not one a model computes in; use torch.float32, torch.bfloat16 or "
                             "torch.float16 (fp8 storage: transformer.enable_layerwise_casting)")
        return name
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a float dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"mgtq stores float tensors as {sorted(DTYPE_NAMES.values())}, not {dtype}") from None
