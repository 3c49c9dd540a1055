import warnings
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

warnings.filterwarnings("ignore", message=".*register_constant.*")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def random_pipeline():
    from mgtq.testing import build_random_pipeline

    return build_random_pipeline()


@pytest.fixture(scope="session")
def random_pipeline_dir(tmp_path_factory, random_pipeline):
    path = tmp_path_factory.mktemp("pipe") / "random-pipe"
    random_pipeline.save_pretrained(path)
    return path
