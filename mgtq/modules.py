"""Helpers on torch modules: cast one without diffusers' spurious float32 warning (`cast_module`), reach the
module under a `torch.compile` wrapper (`unwrapped`), and replace a submodule by its dotted name
(`set_submodule`)."""

from __future__ import annotations

import torch


def cast_module(module: torch.nn.Module, **change) -> None:
    """`module.to(**change)` without diffusers 0.42's warning that modules "should be kept in float32: []": it warns
    on any dtype, even where no module is to be kept (`_keep_in_fp32_modules` empty), and a user then reads
    advice meant for other models on every documented `pipe.to(dtype)`."""
    import logging

    def real(record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()

    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addFilter(real)
    try:
        module.to(**change)
    finally:
        logger.removeFilter(real)


def unwrapped(module):
    """The module under `torch.compile(module)`'s wrapper (its `_orig_mod`), or `module` itself: what holds the
    state-dict keys and submodule names without the wrapper's `_orig_mod.` prefix."""
    return getattr(module, "_orig_mod", module)


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace the submodule at dotted `name` ("blocks.0.attn.to_q") by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
