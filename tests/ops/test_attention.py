"""The quantized attention core (ops/attention.py): the reference against an int64 computation
of its codes, `simulate` against the reference, every backend against the reference, masks,
gradients and refusals.

Exactness by construction: both integer products are exact in int64, and in fp32 below 2^24
(beyond, simulate and the cpu path take fp64), and the reference and `simulate` then apply the
same fp32 operations in the same order, so they agree bit for bit; so does the cpu backend's
path (the products as fp32 GEMMs). The Triton kernel's softmax sums in another order than
torch's (and its exp is its own), so where A/s_A lies within an ulp of a rounding boundary an A
code may differ by one: each such flip moves an output by s_A·s_v·|v_c| ≤ s_A·s_v·max|v_c|.
bf16 inputs are tested in the interpreter too: its products are int8 dots (the interpreter's
bf16 dot is never used).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops.attention import AttentionQuantization, cpu_attention
from qla_kernels.quant.lsq import lsq_fake_quantize
from qla_kernels.quant.primitives import qrange, quantize_with_scale

from ..conftest import examples

BACKENDS = [name for name in ("cpu", "triton") if qk.backends()[name].available]


def _quantization(bits, asymmetric, generator, width=3.0):
    lo, hi = qrange(bits)
    scales = torch.tensor([width / hi] * 3 + [1.0 / (hi - lo)]) * (0.5 + torch.rand(4, generator=generator))
    if not asymmetric:
        return AttentionQuantization(bits, scales.float())
    zeros = torch.randint(-2, 3, (4,), generator=generator).float()
    zeros[3] = lo  # A ≥ 0: its grid starts at qmin
    return AttentionQuantization(bits, scales.float(), zeros)


def _int64_attention(query, key, value, quantization, scaling, mask):
    """The spec written out on the project's quantizer primitive and int64 products."""
    def codes(x, index):
        zero = None if quantization.zeros is None else quantization.zeros[index].round().to(torch.int8)
        q = quantize_with_scale(x, quantization.scales[index], quantization.bits, zero).long()
        return q if zero is None else q - zero.long()

    q, k, v = codes(query, 0), codes(key, 1), codes(value, 2)
    scale = quantization.scales[0] * quantization.scales[1] * scaling
    scores = (q @ k.transpose(-2, -1)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1)
    return ((codes(probs, 3) @ v).float() * (quantization.scales[3] * quantization.scales[2])).to(query.dtype)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 11), st.integers(1, 20))


@examples(25)
@given(shapes, st.sampled_from([4, 8]), st.booleans(), st.sampled_from(["none", "bool", "additive"]),
       st.integers(0, 2 ** 16))
def test_reference_is_the_int64_attention_of_its_codes_and_simulate_and_cpu_are_the_reference(
        shape, bits, asymmetric, mask_kind, seed):
    batch, heads, q_tokens, k_tokens, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(batch, heads, tokens, head_dim, generator=generator)
                         for tokens in (q_tokens, k_tokens, k_tokens))
    quantization = _quantization(bits, asymmetric and bits < 8, generator)
    keep = torch.rand(batch, 1, q_tokens, k_tokens, generator=generator) > 0.3
    mask = {"none": None, "bool": keep, "additive": torch.where(keep, 0.0, -1e4)}[mask_kind]
    scaling = head_dim ** -0.5
    expected = _int64_attention(query, key, value, quantization, scaling, mask)
    with qk.use_backend("reference"):
        reference = ops.quantized_attention(query, key, value, quantization, scaling, mask)
    with qk.use_backend("simulate"):
        simulated = ops.quantized_attention(query, key, value, quantization, scaling, mask)
    if mask_kind == "bool":  # a row without any key: zero output (NaN probabilities quantize to z)
        expected = torch.where(keep.any(dim=-1, keepdim=True), expected, 0.0)
    assert torch.equal(reference, expected)
    assert torch.equal(simulated, reference)
    assert torch.equal(cpu_attention(query, key, value, quantization, scaling, mask), reference)


def _flip_bound(value, quantization, count=2):
    """`count` flipped A codes' worth of output (module docstring)."""
    v_codes = (value / quantization.scales[2]).round().abs().max()
    return count * float(quantization.scales[3] * quantization.scales[2] * (v_codes + 3))


@pytest.mark.parametrize("backend", BACKENDS)
@examples(8)
@given(shapes, st.sampled_from([4, 8]), st.booleans(), st.sampled_from(["none", "bool", "additive", "broadcast"]),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2 ** 16))
def test_backends_match_the_reference(backend, shape, bits, asymmetric, mask_kind, dtype, seed):
    batch, heads, q_tokens, k_tokens, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(batch, heads, tokens, head_dim, generator=generator).to(dtype)
                         for tokens in (q_tokens, k_tokens, k_tokens))
    quantization = _quantization(bits, asymmetric and bits < 8, generator)
    keep = torch.rand(batch, 1, q_tokens, k_tokens, generator=generator) > 0.3
    mask = {"none": None, "bool": keep, "additive": torch.where(keep, 0.0, -1e4),
            "broadcast": torch.where(keep[0, 0], 0.0, float("-inf"))}[mask_kind]
    with qk.use_backend("reference"):
        expected = ops.quantized_attention(query, key, value, quantization, 0.3, mask)
    with qk.use_backend(backend):
        actual = ops.quantized_attention(query, key, value, quantization, 0.3, mask)
    assert actual.dtype == dtype and actual.shape == expected.shape
    # plus one rounding of the output dtype, where a flipped code moved a value across one
    bound = _flip_bound(value.float(), quantization) + float(expected.float().abs().max()) * torch.finfo(dtype).eps
    assert float((actual.float() - expected.float()).abs().max()) <= bound


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ragged_lengths_strided_inputs_and_a_fully_masked_row(backend):
    """Query and key counts off every tile, inputs that are views of a [B, S, H, D] projection
    (HF's transpose), and a row whose every key is masked: zeros, not NaN."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, head_dim = 2, 3, 40
    query = torch.randn(batch, 37, heads, head_dim, generator=generator).transpose(1, 2)
    key = torch.randn(batch, 70, heads, head_dim, generator=generator).transpose(1, 2)
    value = torch.randn(batch, 70, heads, head_dim, generator=generator).transpose(1, 2)
    quantization = _quantization(4, True, generator)
    keep = torch.ones(batch, 1, 37, 70, dtype=torch.bool)
    keep[1, 0, 5] = False
    with qk.use_backend("reference"):
        expected = _int64_attention(query.contiguous(), key.contiguous(), value.contiguous(), quantization, 0.2, keep)
    expected[1, :, 5] = 0.0
    with qk.use_backend(backend):
        actual = ops.quantized_attention(query, key, value, quantization, 0.2, keep)
    assert not actual.isnan().any() and torch.equal(actual[1, :, 5], torch.zeros(heads, head_dim))
    assert float((actual - expected).abs().max()) <= _flip_bound(value, quantization)


def test_bool_and_additive_masks_agree():
    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(3))
    quantization = _quantization(4, True, generator)
    keep = torch.rand(6, 6, generator=generator) > 0.4
    keep[:, 0] = True
    as_bool = ops.quantized_attention(query, key, value, quantization, 0.35, keep)
    as_float = ops.quantized_attention(query, key, value, quantization, 0.35,
                                       torch.zeros(6, 6).masked_fill(~keep, float("-inf")))
    assert torch.equal(as_bool, as_float)


def test_simulate_has_the_lsq_gradients():
    """Trainable steps and zero points receive LSQ+'s gradients: those of composing quant/lsq's
    fake quantizer with fp32 attention, up to fp32 rounding (the two forward orders differ)."""
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(2, 2, 5, 8, generator=generator, requires_grad=True) for _ in range(3))
    scales = torch.tensor([0.4, 0.45, 0.5, 1 / 15], requires_grad=True)
    zeros = torch.tensor([0.2, -1.3, 0.8, -8.0], requires_grad=True)
    with qk.use_backend("simulate"):
        out = ops.quantized_attention(query, key, value, AttentionQuantization(4, scales, zeros), 0.35)
    weights = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value, scales, zeros))

    def composed(q, k, v, s, z):
        q, k, v = (lsq_fake_quantize(t, s[i], z[i], 4) for i, t in enumerate((q, k, v)))
        probs = torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1)
        return lsq_fake_quantize(probs, s[3], z[3], 4) @ v

    expected = torch.autograd.grad((composed(query, key, value, scales, zeros) * weights).sum(),
                                   (query, key, value, scales, zeros))
    for name, actual, wanted in zip(("query", "key", "value", "scales", "zeros"), grads, expected):
        assert torch.isfinite(actual).all(), name
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("call, message", [
    (lambda q, Z: ops.quantized_attention(q[0], q, q, Z, 0.5), "4-D"),
    (lambda q, Z: ops.quantized_attention(q.to(torch.int8), q, q, Z, 0.5), "float16/bfloat16/float32"),
    (lambda q, Z: ops.quantized_attention(q, q[..., :3], q, Z, 0.5), "head_dim"),
    (lambda q, Z: ops.quantized_attention(q, q, q[:, :, :2], Z, 0.5), "value"),
    (lambda q, Z: ops.quantized_attention(q, q, q, Z, 0.0), "scaling"),
    (lambda q, Z: ops.quantized_attention(q, q, q, Z, 0.5, torch.ones(3, 3, dtype=torch.bool)), "broadcast"),
    (lambda q, Z: ops.quantized_attention(q, q, q, Z, 0.5, torch.ones(4, 4, dtype=torch.int32)), "bool or float"),
    (lambda q, Z: ops.quantized_attention(q, q, q, AttentionQuantization(4, torch.ones(3)), 0.5), "shape \\(4,\\)"),
    (lambda q, Z: ops.quantized_attention(q, q, q, AttentionQuantization(4, torch.ones(4).double()), 0.5), "fp32"),
    (lambda q, Z: ops.quantized_attention(q, q, q, AttentionQuantization(4, torch.ones(4), torch.full((4,), 9.0)),
                                          0.5), "integers in \\[-8, 7\\]"),
    (lambda q, Z: ops.quantized_attention(q, q, q, AttentionQuantization(8, torch.ones(4), torch.ones(4)), 0.5),
     "symmetric"),
    (lambda q, Z: ops.quantized_attention(q, q, q, AttentionQuantization(9, torch.ones(4)), 0.5), "bits"),
    (lambda q, Z: ops.quantized_attention(q, q, q, "scales", 0.5), "AttentionQuantization"),
])
def test_malformed_calls_are_value_errors(call, message):
    query = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=message):
        call(query, AttentionQuantization(4, torch.ones(4)))


def test_products_beyond_exact_fp32_run_in_fp64_and_int32_overflow_is_refused():
    """8-bit symmetric codes over 1100 keys can sum past 2^24: simulate and the cpu path take fp64
    there and stay the reference; past 2^31 (the kernels' int32 accumulators) the call is refused."""
    generator = torch.Generator().manual_seed(6)
    query, key = torch.randn(1, 1, 3, 16, generator=generator), torch.randn(1, 1, 1100, 16, generator=generator)
    quantization = AttentionQuantization(8, torch.tensor([0.03, 0.03, 0.03, 1e-4]))
    reference = ops.quantized_attention(query, key, key, quantization, 0.25)
    with qk.use_backend("simulate"):
        assert torch.equal(ops.quantized_attention(query, key, key, quantization, 0.25), reference)
    assert torch.equal(cpu_attention(query, key, key, quantization, 0.25), reference)
    huge = torch.empty(1, 1, 2, 16)
    with pytest.raises(ValueError, match="int32"):
        ops.quantized_attention(huge, torch.empty(1, 1, 140000, 16), torch.empty(1, 1, 140000, 16), quantization, 0.1)
