"""The benchmark lab beside the harness: peers, the profiler's operator categories, PNG plots.

They live in the repository's `benchmarks/` (bench_peers.py, bench_profile.py, bench_plot.py), not in
the installed package, and are loaded from there only when a run asks for them (`--peers`,
`--profile`, `--plot`). So those options need a checkout of mgtq (`pip install -e .`); `mgtq bench`
itself runs from a wheel.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_lab(name: str) -> ModuleType:
    """benchmarks/bench_<name>.py of the checkout this mgtq runs from, imported once."""
    module_name = f"mgtq_bench_lab_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = ROOT / "benchmarks" / f"bench_{name}.py"
    if not ((ROOT / "pyproject.toml").is_file() and path.is_file()):
        raise FileNotFoundError(f"benchmarks/bench_{name}.py is not here: this option of mgtq bench needs a "
                                  "checkout of mgtq's repository (git clone, then pip install -e .)")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
