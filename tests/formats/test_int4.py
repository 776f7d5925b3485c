import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qla_kernels.formats import pack_int4, unpack_int4


@given(rows=st.integers(1, 5), half_cols=st.integers(1, 40), signed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, half_cols, signed, seed):
    lo, hi = (-8, 7) if signed else (0, 15)
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(lo, hi + 1, (rows, 2 * half_cols), generator=generator, dtype=torch.int8)
    packed = pack_int4(values, signed=signed)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_cols)
    assert torch.equal(unpack_int4(packed, signed=signed), values)


def test_layout_low_nibble_is_even_element():
    packed = pack_int4(torch.tensor([[1, 2, -1, -8]], dtype=torch.int8), signed=True)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert pack_int4(torch.tensor([15, 0], dtype=torch.uint8), signed=False).tolist() == [0x0F]


def test_every_signed_nibble_value():
    values = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(values, signed=True), signed=True), values)


@pytest.mark.parametrize(
    "values, signed, match",
    [
        (torch.zeros(3, dtype=torch.int8), True, "even"),
        (torch.tensor([8, 0], dtype=torch.int8), True, r"\[-8, 7\]"),
        (torch.tensor([-1, 0], dtype=torch.int8), False, r"\[0, 15\]"),
        (torch.zeros(2), True, "integer"),
    ],
)
def test_pack_rejects_bad_input(values, signed, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(values, signed=signed)


def test_unpack_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, dtype=torch.int8), signed=True)
