import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qla_kernels.formats.weights import GROUP_SCALE_MAX
from qla_kernels.quant import (
    dequantize,
    qrange,
    quantize_asymmetric,
    quantize_progressive_int4,
    quantize_symmetric,
    quantize_with_scale,
)

shapes = st.tuples(st.integers(1, 6), st.sampled_from([16, 32, 48, 64]))


def _random(shape, seed, spread):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * spread


@given(shape=shapes, bits=st.integers(2, 8), granularity=st.sampled_from(["tensor", "row", "group"]),
       seed=st.integers(0, 10_000), spread=st.floats(1e-3, 1e3))
def test_symmetric_error_is_at_most_half_a_step(shape, bits, granularity, seed, spread):
    x = _random(shape, seed, spread)
    q, scale = quantize_symmetric(x, bits, granularity, group_size=16)
    lo, hi = qrange(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= lo and int(q.max()) <= hi
    error = (dequantize(q, scale, group_size=16) - x).abs()
    if granularity == "tensor":
        step = scale.expand_as(x)
    elif granularity == "row":
        step = scale[:, None].expand_as(x)
    else:
        step = scale.repeat_interleave(16, dim=-1)
    assert bool((error <= step / 2 * (1 + 1e-6)).all())


@given(shape=shapes, bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 10_000),
       offset=st.floats(-5, 5))
def test_asymmetric_error_is_at_most_half_a_step(shape, bits, signed, seed, offset):
    x = _random(shape, seed, 1.0) + offset
    q, scale, zero = quantize_asymmetric(x, bits, "group", group_size=16, signed=signed)
    lo, hi = qrange(bits, signed)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    assert int(zero.min()) >= lo and int(zero.max()) <= hi
    error = (dequantize(q, scale, zero, group_size=16) - x).abs()
    # The zero point is rounded, so the range can shift by up to half a step at the ends; +1 step bound.
    assert bool((error <= scale.repeat_interleave(16, dim=-1) * (1 + 1e-5)).all())


def test_zero_is_exact_in_asymmetric_quantization():
    x = torch.tensor([[0.0, 0.3, 1.7, 2.9]])
    q, scale, zero = quantize_asymmetric(x, 4, "row")
    assert dequantize(q, scale, zero)[0, 0].item() == 0.0


def test_per_group_scale_is_the_group_absmax():
    x = torch.cat([torch.full((1, 16), 1.0), torch.full((1, 16), -4.0)], dim=1)
    q, scale = quantize_symmetric(x, 8, "group", group_size=16)
    assert torch.allclose(scale, torch.tensor([[1.0 / 127, 4.0 / 127]]))
    assert torch.equal(q[0, :16], torch.full((16,), 127, dtype=torch.int8))
    assert torch.equal(q[0, 16:], torch.full((16,), -127, dtype=torch.int8))


def test_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    q = quantize_with_scale(x, torch.tensor(1.0), 8)
    assert q.tolist() == [0, 2, 2, 0, -2, -2]


def test_static_scale_clamps_to_the_signed_range():
    q = quantize_with_scale(torch.tensor([1000.0, -1000.0]), torch.tensor(1.0), 8)
    assert q.tolist() == [127, -128]


def test_zero_rows_give_zeros_not_nan():
    q, scale = quantize_symmetric(torch.zeros(3, 16), 8, "row")
    assert torch.equal(q, torch.zeros_like(q)) and bool(torch.isfinite(scale).all())
    assert torch.equal(dequantize(q, scale), torch.zeros(3, 16))


def test_non_finite_values_propagate_through_the_scale():
    x = torch.ones(2, 16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    q, scale = quantize_symmetric(x, 8, "row")
    assert scale[0].isnan() and scale[1].isinf()
    assert not bool(torch.isfinite(dequantize(q, scale)).any())


@given(rows=st.integers(1, 4), groups=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_progressive_int4_stays_in_int8_and_is_close(rows, groups, seed):
    w = _random((rows, 32 * groups), seed, 0.05)
    q4, group_scale, channel_scale = quantize_progressive_int4(w, 32)
    assert int(q4.abs().max()) <= 7
    assert int(group_scale.min()) >= 1 and int(group_scale.max()) <= GROUP_SCALE_MAX
    w8 = q4.int() * group_scale.int().repeat_interleave(32, dim=1)
    assert int(w8.abs().max()) <= 119
    # Two roundings: half an int8 step, then half a group step (in int8 units).
    recon = w8.float() * channel_scale[:, None]
    bound = (0.5 + group_scale.float().repeat_interleave(32, dim=1) / 2) * channel_scale[:, None] * (1 + 1e-5)
    assert bool(((recon - w).abs() <= bound).all())


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        qrange(bits)


def test_bad_granularity_and_group():
    with pytest.raises(ValueError, match="granularity"):
        quantize_symmetric(torch.ones(2, 16), 8, "channel")
    with pytest.raises(ValueError, match="group_size"):
        quantize_symmetric(torch.ones(2, 24), 8, "group", group_size=16)
