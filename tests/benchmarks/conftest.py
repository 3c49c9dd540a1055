"""The benchmarks/ tests load each script as a module (its functions and main(argv)), not as a process."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_script():
    """benchmark_script(name) → benchmarks/<name>.py as a module, loaded once per session.

    Meanwhile benchmarks/ is on sys.path (scripts import their neighbours) and each module is in
    sys.modules under its name (dataclasses look their module up there); both are undone at the end.
    """
    sys.path.insert(0, str(BENCHMARKS))
    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
    sys.path.remove(str(BENCHMARKS))
