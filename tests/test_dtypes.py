"""mgtq.dtypes: dtype names, short and canonical, parsed and named."""

import pytest
import torch

from mgtq.dtypes import dtype_name, parse_dtype


def test_dtype_names():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(None) is None and dtype_name(torch.float16) == "float16"
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        parse_dtype("int3")
