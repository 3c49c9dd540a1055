import sys
import warnings
from pathlib import Path

import pytest
import torch

# The test fixtures (`testkit.py`) live beside the tests, not in the installed package; test folders are not
# packages (pyproject's --import-mode=importlib), so this folder goes on the path for them.
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

warnings.filterwarnings("ignore", message=".*register_constant.*")


@pytest.fixture(autouse=True, scope="session")
def _compile_cache_in_tmp(tmp_path_factory):
    # compile_blocks keeps compiled code in mgtq's user cache folder: tests must not fill the real one.
    import os

    os.environ.setdefault("MGTQ_CACHE_DIR", str(tmp_path_factory.mktemp("mgtq-cache")))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def random_pipeline():
    from testkit import build_random_pipeline

    return build_random_pipeline()


@pytest.fixture(scope="session")
def random_pipeline_dir(tmp_path_factory, random_pipeline):
    path = tmp_path_factory.mktemp("pipe") / "random-pipe"
    random_pipeline.save_pretrained(path)
    return path
