"""Compile once: torch.compile's on-disk caches kept in mgtq's user cache folder.

A compiled forward costs Dynamo tracing + AOTAutograd + Inductor code generation and C++ builds.
torch caches the last two on disk (Inductor's FX-graph cache, the AOTAutograd cache, the built
kernels) keyed by graph, shapes, torch version and config, but in a temporary folder
(`/tmp/torchinductor_<user>`) that a reboot or a tmp cleaner empties. `use_persistent_compile_cache`
points those caches at `cache_dir() / "torch-compile"`, so a second `mgtq generate --compile` on the
same model and shapes loads the compiled code instead of building it; only Dynamo's tracing of each
distinct block is paid again. Nothing is written into the repository or the install folder. The
folder's name carries a digest of mgtq's custom-op schemas (`ops_digest`), which torch's keys miss.

Where: `$MGTQ_CACHE_DIR`, else `$XDG_CACHE_HOME/mgtq`, else `~/.cache/mgtq`. A
`TORCHINDUCTOR_CACHE_DIR` the user set wins over all of them (torch's own knob keeps its meaning).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

CACHE_ENV = "MGTQ_CACHE_DIR"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

__all__ = ["CACHE_ENV", "cache_dir", "compile_cache_dir", "ops_digest", "use_persistent_compile_cache"]


def cache_dir() -> Path:
    """mgtq's user cache folder (not created here): $MGTQ_CACHE_DIR, $XDG_CACHE_HOME/mgtq or ~/.cache/mgtq."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mgtq"


def compile_cache_dir() -> Path:
    """Where torch.compile's caches go: one folder per torch version and per set of mgtq op schemas."""
    return cache_dir() / "torch-compile" / f"torch-{torch.__version__}-ops-{ops_digest()}"


def ops_digest(namespace: str = "mgtq") -> str:
    """12 hex digits of the schemas of the custom ops in `namespace` (mgtq's: once its kernels are imported).

    Inductor's cache keys cover the traced graph, not the schemas of the custom ops it calls: code
    compiled before an op's argument was renamed would be loaded and call the op with the old name.
    """
    import mgtq.quantization.kernels  # noqa: F401  (registers mgtq's ops)

    prefix = f"{namespace}::"
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))
    schemas = "\n".join(str(torch._C._get_schema(name, "")) for name in names)
    return hashlib.sha256(schemas.encode()).hexdigest()[:12]


def _user_set_inductor_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR if the user set it (torch itself writes its temp default there on first use)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = os.environ.get(INDUCTOR_CACHE_ENV)
    if not value or os.path.abspath(value) == os.path.abspath(default_cache_dir()):
        return None
    return value


def use_persistent_compile_cache() -> Path:
    """Send torch.compile's on-disk caches to `compile_cache_dir()` for this process; the folder used.

    Call before the first compiled forward (compiling is lazy: `compile_blocks` calls this). Turns on
    the FX-graph and AOTAutograd caches (torch's defaults, set here in case a config turned them off).
    """
    import torch._functorch.config
    import torch._inductor.config

    user = _user_set_inductor_dir()
    folder = Path(user) if user else compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the compile cache folder {folder} ({err.strerror}); set {CACHE_ENV} to a "
                      "writable folder") from None
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return folder
