"""mgtq.compilation: torch.compile's caches in mgtq's user cache folder, and a warm start that uses them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgtq import compilation

REPO = Path(__file__).resolve().parents[1]


def test_cache_dir_follows_mgtq_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.cache_dir() == tmp_path / "xdg" / "mgtq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation.cache_dir() == Path.home() / ".cache" / "mgtq"
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mine"))
    assert compilation.cache_dir() == tmp_path / "mine"
    assert compilation.compile_cache_dir().parent == tmp_path / "mine" / "torch-compile"


def test_cache_folder_changes_with_the_custom_op_schemas():
    # A cached graph calls mgtq's ops by their argument names: a schema change must not load it.
    import torch

    assert compilation.compile_cache_dir().name.endswith(compilation.ops_digest())
    before = compilation.ops_digest("mgtq_schema_probe")
    torch.library.define("mgtq_schema_probe::op", "(Tensor x, int renamed) -> Tensor")
    assert compilation.ops_digest("mgtq_schema_probe") != before
    assert compilation.ops_digest() != before  # mgtq's own ops are registered and counted


def test_persistent_cache_goes_to_the_user_folder_unless_torch_s_own_knob_is_set(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mgtq"))
    monkeypatch.setenv(compilation.INDUCTOR_CACHE_ENV, default_cache_dir())  # what torch writes on first use
    folder = compilation.use_persistent_compile_cache()
    assert folder == compilation.compile_cache_dir() and folder.is_dir()
    assert os.environ[compilation.INDUCTOR_CACHE_ENV] == str(folder)
    monkeypatch.setenv(compilation.INDUCTOR_CACHE_ENV, str(tmp_path / "users-own"))
    assert compilation.use_persistent_compile_cache() == tmp_path / "users-own"


def test_compile_blocks_uses_the_persistent_cache(monkeypatch, tmp_path):
    from mgtq.models.presets import build_transformer

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    build_transformer("test-micro").compile_blocks(backend="eager")
    assert os.environ[compilation.INDUCTOR_CACHE_ENV] == str(compilation.compile_cache_dir())


# One small quantized layer and a neighbour (few kernels to build: the test is about the cache).
_COMPILE_ONCE = """
import json, torch
from torch._dynamo.utils import counters
from mgtq.compilation import use_persistent_compile_cache
from mgtq.quantization import W4A8Linear
torch.set_num_threads(1)
torch.manual_seed(0)
layer = W4A8Linear.from_float(torch.nn.Linear(64, 32), 0.05)
use_persistent_compile_cache()
with torch.no_grad():
    torch.compile(lambda x: layer(torch.relu(x)), fullgraph=True)(torch.randn(40, 64))
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_second_process_loads_the_compiled_code_from_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != compilation.INDUCTOR_CACHE_ENV}
    env[compilation.CACHE_ENV] = str(tmp_path / "cache")

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = run()
    assert cold.get("fxgraph_cache_miss", 0) > 0 and cold.get("fxgraph_cache_hit", 0) == 0, cold
    assert any((tmp_path / "cache" / "torch-compile").rglob("*")), "nothing was written to the user cache"
    warm = run()
    assert warm.get("fxgraph_cache_hit", 0) > 0 and warm.get("fxgraph_cache_miss", 0) == 0, warm


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
