"""pack_int4 / unpack_int4 round trips and layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgtq.quantization.packing import pack_int4, unpack_int4, unpack_int4_times16

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).flatmap(
    lambda lead: st.integers(1, 40).map(lambda half: (*lead, 2 * half))
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_round_trip_exact(shape, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(unpack_int4_times16(packed), q * 16)


def test_all_byte_values_round_trip():
    # Every possible byte decodes and re-encodes to itself.
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


def test_layout_is_split_halves():
    q = torch.tensor([[1, -2, 3, -8, 7, 0]], dtype=torch.int8)
    packed = pack_int4(q)
    # byte j = q[j] (low nibble) | q[j + K/2] (high nibble), two's complement nibbles
    expected = [(1 & 0xF) | ((-8 & 0xF) << 4), (-2 & 0xF) | (7 << 4), (3 & 0xF) | (0 << 4)]
    assert packed.tolist() == [expected]


def test_unpack_into_out_buffer_and_strided_rows():
    q = torch.randint(-8, 8, (6, 16), dtype=torch.int8)
    packed = pack_int4(q)
    out = torch.empty(3, 16, dtype=torch.int8)
    assert unpack_int4(packed[::2], out=out) is out
    assert torch.equal(out, q[::2])


def test_errors():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="out must be"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.uint8), out=torch.empty(2, 4, dtype=torch.int8))


def test_meta_device():
    packed = pack_int4(torch.empty(4, 8, dtype=torch.int8, device="meta"))
    assert packed.device.type == "meta" and packed.shape == (4, 4)
    assert unpack_int4(packed).shape == (4, 8)
