"""Not per module: it checks what importing the package and its entry points pulls in.

What importing mgtq pulls in: never the test fixtures (tests/testkit.py, importable in the probe so that an import of
it would show) nor matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("testkit", "matplotlib")
TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("modules", [("mgtq", "mgtq.cli", "mgtq.bench"),
                                     ("mgtq.bench.runner", "mgtq.bench.case", "mgtq.bench.build", "mgtq.models.random")])
def test_mgtq_imports_neither_the_test_fixtures_nor_matplotlib(modules):
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {list(modules)}]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mgtq', 'testkit', 'matplotlib')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = eval(proc.stdout.strip().splitlines()[-1])
    assert all(m in loaded for m in modules)  # the probe really imported them
    bad = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert not bad, f"importing {modules} loaded {bad}"
