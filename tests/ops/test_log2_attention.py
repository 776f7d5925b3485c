"""The `paper` preset's attention core (ops/attention.py, `TokenwiseLog2Quantization`): its log2
levels and tf32 rounding against fp64 arithmetic, the reference against a computation written
out on the project's quantizer primitives, `simulate` and every backend against the reference,
masks, gradients and refusals.

What is exact by construction: the codes and steps (the same fp32 ops everywhere), q_c·k_c
(integers), S (the same fp32 ops in the same order: the kernel does not contract them), each
product Â·v̂ (a power of two times an 11-bit significand), and `simulate` = the cpu path (one
function). What is not: the order of the fp32 sums of Â·v̂ (the reference sums in fp64), bounded
by γ_n·Σ|Â·v̂|; and in the Triton kernel the softmax (its exp and the order of its sums), so where
A lies within a few ulps of a level boundary 2^−(k+½) its level may be the neighbour, which moves
an output by the difference of the two levels times |v̂|: the bound adds that for every entry of A
inside such a window.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.methods import paper
from qla_kernels.ops.attention import TokenwiseLog2Quantization, round_to_tf32, tokenwise_codes
from qla_kernels.ops.simulate import fake_quantize_activation
from qla_kernels.quant.log2 import log2_levels, log2_quantize
from qla_kernels.quant.primitives import quantize_symmetric

from ..conftest import examples

BACKENDS = [name for name in ("cpu", "triton") if qk.backends()[name].available]
# Relative distance to a level boundary within which the kernel's softmax may land on either side.
WINDOW = 2.0 ** -13


@examples(30)
@given(st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=64), st.sampled_from([2, 4, 6, 8]))
def test_log2_levels_are_rint_of_minus_log2_in_fp64(values, bits):
    p = torch.tensor(values, dtype=torch.float32)
    exponent = torch.round(-torch.log2(p.double())).clamp(0, (1 << bits) - 1)
    expected = torch.where((p > 0) & (exponent <= 126), torch.exp2(-exponent), 0.0).float()
    normal = p >= 2.0 ** -126  # below, the subnormal rule of quant/log2 (the largest level)
    assert torch.equal(log2_levels(p, bits)[normal], expected[normal])


def test_log2_levels_at_the_boundaries():
    """Either side of 2^−(k+½): the neighbours of fp32(2^−(k+½)) land on 2^−k and 2^−(k+1);
    exact 0 and NaN give 0, a subnormal the largest level, 1 gives 1."""
    for k in range(0, 14):
        boundary = torch.tensor(2.0 ** -(k + 0.5), dtype=torch.float32)
        above = torch.nextafter(boundary, torch.tensor(1.0))
        below = torch.nextafter(boundary, torch.tensor(0.0))
        expected_at = 2.0 ** -k if float(boundary) > 2.0 ** -(k + 0.5) else 2.0 ** -(k + 1)
        assert log2_levels(torch.stack([above, boundary, below]), 4).tolist() == [
            2.0 ** -k, expected_at, 2.0 ** -(k + 1)]
    special = torch.tensor([0.0, float("nan"), 1e-40, 1.0])
    assert log2_levels(special, 4).tolist() == [0.0, 0.0, 2.0 ** -15, 1.0]
    assert log2_levels(special, 8).tolist() == [0.0, 0.0, 0.0, 1.0]  # 2^−255 is no fp32


@examples(30)
@given(st.lists(st.floats(-2.0 ** 100, 2.0 ** 100, width=32)
                | st.floats(-2.0 ** -120, 2.0 ** -120, width=32), min_size=1, max_size=64))
def test_round_to_tf32_is_round_to_eleven_significant_bits(values):
    """Below 2^−126 tf32, like fp32, is subnormal: its grid there is 2^−136 (10 fraction bits)."""
    x = torch.tensor(values, dtype=torch.float32)
    _, exponent = torch.frexp(x.double())
    quantum = torch.exp2((exponent - 11).clamp_min(-136).double())
    expected = (torch.round(x.double() / quantum) * quantum).float()
    assert torch.equal(round_to_tf32(x), expected)


def _written_out(query, key, value, bits, scaling, mask):
    """The spec on the project's per-row quantizer and int64 / fp64 products."""
    (q, q_steps), (k, k_steps), (v, v_steps) = (quantize_symmetric(t, bits, "row") for t in (query, key, value))
    products = (q.long() @ k.long().transpose(-2, -1)).float()
    scores = products * (q_steps[..., None] * scaling) * k_steps[..., None, :]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    levels = log2_levels(torch.softmax(scores, dim=-1), bits)
    values = round_to_tf32(v.float() * v_steps[..., None])
    return (levels.double() @ values.double()).float().to(query.dtype), levels, values


def _sum_bound(levels, values, keys):
    """γ_n·Σ|Â·v̂| for fp32 sums of n = keys exact products (n·2^−24 / (1 − n·2^−24), doubled)."""
    return 2 * keys * 2.0 ** -24 * (levels.double() @ values.double().abs()).float()


def _flip_bound(query, key, value, bits, scaling, mask):
    """Per output: the level change of each entry of A within WINDOW of a boundary, times |v̂|,
    plus the sum bound (module docstring)."""
    _, levels, values = _written_out(query.float(), key.float(), value.float(), bits, scaling, mask)
    (q, q_steps), (k, k_steps) = (quantize_symmetric(t.float(), bits, "row") for t in (query, key))
    scores = (q.long() @ k.long().transpose(-2, -1)).float() * (q_steps[..., None] * scaling) * k_steps[..., None, :]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).double()
    position = -torch.log2(probs.clamp_min(1e-300))
    nearest = torch.floor(position) + 0.5  # the boundary 2^−(k+½) nearest above or below in log space
    near = (torch.minimum((position - nearest).abs(), (position - nearest + 1).abs()) * math.log(2) < WINDOW)
    near &= position < (1 << bits)  # past the largest level's boundary both sides clamp to it
    near |= (probs > 0) & (probs < 2.0 ** -100)  # may underflow to 0 in another exp
    step = torch.where(near, torch.exp2(-torch.floor(position).clamp(0, (1 << bits) - 1)) / 2, 0.0)
    return (step @ values.double().abs()).float() + _sum_bound(levels, values, key.shape[-2])


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 11), st.integers(1, 20))
MASKS = ["none", "bool", "additive", "broadcast"]


def _case(shape, mask_kind, dtype, seed):
    batch, heads, q_tokens, k_tokens, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(batch, heads, tokens, head_dim, generator=generator).to(dtype)
                         for tokens in (q_tokens, k_tokens, k_tokens))
    keep = torch.rand(batch, 1, q_tokens, k_tokens, generator=generator) > 0.3
    mask = {"none": None, "bool": keep, "additive": torch.where(keep, 0.0, -1e4),
            "broadcast": torch.where(keep[0, 0], 0.0, float("-inf"))}[mask_kind]
    return query, key, value, keep, mask


@examples(25)
@given(shapes, st.sampled_from([3, 4, 8]), st.sampled_from(MASKS), st.integers(0, 2 ** 16))
def test_reference_is_the_written_out_spec_and_simulate_is_the_cpu_path_within_the_sum_bound(
        shape, bits, mask_kind, seed):
    query, key, value, keep, mask = _case(shape, mask_kind, torch.float32, seed)
    quantization = TokenwiseLog2Quantization(bits)
    expected, levels, values = _written_out(query, key, value, bits, 0.3, mask)
    with qk.use_backend("reference"):
        reference = ops.quantized_attention(query, key, value, quantization, 0.3, mask)
    with qk.use_backend("simulate"):
        simulated = ops.quantized_attention(query, key, value, quantization, 0.3, mask)
    cpu_path = torch.ops.qla.log2_attention_cpu(query, key, value, bits, 0.3, mask)
    assert torch.equal(reference, expected)
    assert torch.equal(simulated, cpu_path)
    assert bool(((simulated - reference).abs() <= _sum_bound(levels, values, shape[3])).all())
    if mask_kind == "bool":  # a query row without any key gives zeros
        assert torch.equal(reference * ~keep.any(dim=-1, keepdim=True), torch.zeros_like(reference))


@pytest.mark.parametrize("backend", BACKENDS)
@examples(8)
@given(shapes, st.sampled_from([4, 8]), st.sampled_from(MASKS),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2 ** 16))
def test_backends_match_the_reference(backend, shape, bits, mask_kind, dtype, seed):
    query, key, value, _, mask = _case(shape, mask_kind, dtype, seed)
    quantization = TokenwiseLog2Quantization(bits)
    with qk.use_backend("reference"):
        expected = ops.quantized_attention(query, key, value, quantization, 0.3, mask)
    with qk.use_backend(backend):
        actual = ops.quantized_attention(query, key, value, quantization, 0.3, mask)
    assert actual.dtype == dtype and actual.shape == expected.shape
    # plus one rounding of the output dtype each side of the fp32 result
    bound = _flip_bound(query, key, value, bits, 0.3, mask) + 2 * expected.float().abs() * torch.finfo(dtype).eps
    assert bool(((actual.float() - expected.float()).abs() <= bound).all())


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ragged_lengths_strided_inputs_and_a_fully_masked_row(backend):
    """Query and key counts off every tile, [B, S, H, D] views (HF's transpose), head_dim 40
    (padded in the kernel: padding must not raise a token's absmax), and a row whose every key
    is masked: zeros, not NaN."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, head_dim = 2, 3, 40
    query, key, value = (torch.randn(batch, tokens, heads, head_dim, generator=generator).transpose(1, 2)
                         for tokens in (37, 70, 70))
    keep = torch.ones(batch, 1, 37, 70, dtype=torch.bool)
    keep[1, 0, 5] = False
    keep[0, 0, :, 60:] = False
    with qk.use_backend(backend):
        actual = ops.quantized_attention(query, key, value, TokenwiseLog2Quantization(4), 0.2, keep)
    expected = _written_out(query.contiguous(), key.contiguous(), value.contiguous(), 4, 0.2, keep)[0]
    expected[1, :, 5] = 0.0
    assert not actual.isnan().any() and torch.equal(actual[1, :, 5], torch.zeros(heads, head_dim))
    assert bool(((actual - expected).abs() <= _flip_bound(query, key, value, 4, 0.2, keep)).all())


def test_simulate_has_straight_through_gradients():
    """The gradients of composing the per-token fake quantizer, fp32 attention, the log2
    quantizer and v̂'s tf32 rounding (each straight-through), up to fp32 rounding."""
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(2, 2, 5, 8, generator=generator, requires_grad=True) for _ in range(3))
    with qk.use_backend("simulate"):
        out = ops.quantized_attention(query, key, value, TokenwiseLog2Quantization(4), 0.35)
    weights = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))

    def composed(q, k, v):
        q, k, v = (fake_quantize_activation(t.reshape(-1, 8), 4, None, None).reshape(t.shape) for t in (q, k, v))
        return log2_quantize(torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1), 4) @ round_to_tf32(v)

    expected = torch.autograd.grad((composed(query, key, value) * weights).sum(), (query, key, value))
    for name, actual, wanted in zip(("query", "key", "value"), grads, expected):
        assert torch.isfinite(actual).all(), name
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5, msg=name)


def test_tokenwise_codes_steps_are_per_token_absmax():
    x = torch.tensor([[0.0, 0.0], [1.4, -0.7], [float("nan"), 1.0]])
    codes, steps = tokenwise_codes(x, 4)
    assert steps[:2, 0].tolist() == [(torch.tensor(1e-8) / 7).item(), (torch.tensor(1.4) / 7).item()]
    assert codes[:2].tolist() == [[0.0, 0.0], [7.0, -4.0]] and codes[2, 0] == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda q: ops.quantized_attention(q, q, q, TokenwiseLog2Quantization(9), 0.5), "bits"),
    (lambda q: ops.quantized_attention(q, q, q, TokenwiseLog2Quantization(4), -1.0), "scaling"),
    (lambda q: ops.quantized_attention(torch.empty(1, 1, 1, 140000), torch.empty(1, 1, 1, 140000),
                                       torch.empty(1, 1, 1, 140000), TokenwiseLog2Quantization(8), 0.1), "int32"),
    (lambda q: paper.quantized_sdpa(q, q, q, dropout_p=0.1), "dropout"),
    (lambda q: paper.quantized_sdpa(q[0, 0], q[0, 0], q[0, 0]), "tokens, head_dim"),
    (lambda q: paper.quantized_sdpa(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True),
     "not both"),
])
def test_malformed_calls_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 2, 4, 8))


def test_the_preset_is_the_core_with_sdpa_conventions():
    """quantized_sdpa: default scale 1/√d, is_causal as a lower-triangular mask, grouped keys
    repeated per query head, 3-D inputs as one head; the same values as the op."""
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(2, 4, 6, 16, generator=generator)
    key, value = (torch.randn(2, 2, 6, 16, generator=generator) for _ in range(2))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = ops.quantized_attention(query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1),
                                       TokenwiseLog2Quantization(4), 0.25, causal)
    assert torch.equal(paper.quantized_sdpa(query, key, value, is_causal=True, enable_gqa=True, bits=4), expected)
    flat = paper.quantized_sdpa(query[:, 0], key[:, 0], value[:, 0], attn_mask=causal[None].expand(2, 6, 6), bits=4)
    assert torch.equal(flat, expected[:, 0])
