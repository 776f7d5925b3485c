"""`attention_rows` (ops/attention.py) on the CPU kernel (csrc/cpu/isa_common.h attention_heads)
against the fp64 reference, on every instruction-set path this machine runs. The kernel's sums
are its own (fused multiply-adds, its exp), so results are compared within a bound derived from
fp32 rounding, never bit for bit; across thread counts they are bit for bit (whole heads per task)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops import cpu
from qla_kernels.ops.attention import reference_attention_rows

from ..conftest import examples
from .helpers import at_thread_counts

pytestmark = pytest.mark.skipif(not qk.backends()["cpu"].available, reason=str(qk.backends()["cpu"]))
PATHS = cpu.supported_isas() if qk.backends()["cpu"].available else []
UNIT = 2.0 ** -24  # fp32's unit roundoff


def _rows(sequences, tokens, heads, head_dim, seed, spread=1.0):
    """q, k, v as column slices of one packed [sequences · tokens, 3 · heads · head_dim] GEMM output."""
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randn(sequences * tokens, 3 * heads * head_dim, generator=generator) * spread
    return packed.split(heads * head_dim, dim=1)


def _bound(query, key, value, tokens, heads, scale):
    """|kernel − exact| <= this: each score's dot carries at most head_dim roundings of its terms'
    absolute sum (times the scale), which the softmax turns into a relative error of twice that in
    the weights; the exp, the normalization and the T-term sum of weights · v add T + 8 more
    roundings; the output is at most max |v| in size. Doubled for slack."""
    q, k = (t.double().abs().unflatten(0, (-1, tokens)).unflatten(2, (heads, -1)).transpose(1, 2)
            for t in (query, key))
    head_dim = query.shape[1] // heads
    largest_dot = float((q @ k.transpose(-2, -1)).max()) * abs(scale)
    return 2 * UNIT * (2 * head_dim * largest_dot + tokens + 8) * float(value.abs().max())


def _check(path, query, key, value, tokens, heads, scale=None, mask=None):
    with qk.use_backend("cpu"), cpu.using_isa(path):
        actual = ops.attention_rows(query, key, value, tokens, heads, scale=scale, mask=mask)
    exact_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    expected = reference_attention_rows(query.double(), key.double(), value.double(), tokens, heads, scale, exact_mask)
    assert actual.shape == query.shape and actual.dtype == torch.float32 and actual.is_contiguous()
    head_dim = query.shape[1] // heads
    bound = _bound(query, key, value, tokens, heads, head_dim ** -0.5 if scale is None else scale)
    assert float((actual.double() - expected).abs().max()) <= bound
    return actual


def _masks(sequences, heads, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(sequences, 1, tokens, tokens, generator=generator) > 0.3
    keep[..., 0] = True
    padding = torch.zeros(sequences, 1, 1, tokens)
    padding[0, ..., tokens // 2:] = float("-inf")  # a padded sequence, as BERT's mask
    return {"none": None, "bool per row": keep, "float padding": padding,
            "float per head": torch.randn(sequences, heads, tokens, tokens, generator=generator),
            "large negative": torch.where(keep, 0.0, torch.finfo(torch.float32).min),
            "2-D": torch.randn(tokens, tokens, generator=generator)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [1, 7, 17, 33])
@pytest.mark.parametrize("head_dim", [8, 20, 32, 64])
@pytest.mark.parametrize("mask_kind", ["none", "bool per row", "float padding", "float per head", "large negative", "2-D"])
def test_against_the_exact_reference(path, tokens, head_dim, mask_kind):
    """Ragged tokens (lanes of 8 and 16 with a partial tail, one token) and head sizes (whole lanes,
    read in place, or not: copied), every mask form."""
    sequences, heads = 3, 2
    query, key, value = _rows(sequences, tokens, heads, head_dim, seed=tokens * head_dim)
    _check(path, query, key, value, tokens, heads, mask=_masks(sequences, heads, tokens, seed=tokens)[mask_kind])


@pytest.mark.parametrize("path", PATHS)
def test_rows_whose_every_key_is_masked_are_zero_as_torch_gives_them(path):
    query, key, value = _rows(2, 5, 3, 16, seed=1)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, 2] = False
    actual = _check(path, query, key, value, 5, 3, mask=mask)
    assert torch.equal(actual[7], torch.zeros(48))
    float_mask = torch.where(mask, 0.0, float("-inf"))
    with qk.use_backend("cpu"), cpu.using_isa(path):
        assert torch.equal(ops.attention_rows(query, key, value, 5, 3, mask=float_mask), actual)
    assert torch.equal(reference_attention_rows(query, key, value, 5, 3, None, mask)[7], torch.zeros(48))


@pytest.mark.parametrize("path", PATHS)
def test_large_scores_and_an_explicit_scale(path):
    """Scores far apart (the exp's clamp and the max's subtraction) and a scale that is not 1/√d."""
    query, key, value = _rows(2, 19, 2, 24, seed=3, spread=4.0)
    _check(path, query, key, value, 19, 2, scale=0.9)
    _check(path, query, key, value, 19, 2, scale=-0.05)


@pytest.mark.parametrize("path", PATHS)
def test_nan_propagates(path):
    query, key, value = _rows(1, 6, 1, 16, seed=4)
    key = key.clone()
    key[2, 3] = float("nan")
    with qk.use_backend("cpu"), cpu.using_isa(path):
        out = ops.attention_rows(query, key, value, 6, 1)
    assert out.isnan().all()


@pytest.mark.parametrize("path", PATHS)
def test_results_do_not_depend_on_the_thread_count(path):
    query, key, value = _rows(5, 13, 3, 20, seed=5)
    mask = _masks(5, 3, 13, seed=5)["bool per row"]
    with qk.use_backend("cpu"), cpu.using_isa(path):
        results = at_thread_counts(lambda: ops.attention_rows(query, key, value, 13, 3, mask=mask))
    assert torch.equal(results[0], results[1])


@given(sequences=st.integers(1, 4), tokens=st.integers(1, 40), heads=st.integers(1, 4), head_dim=st.integers(1, 70),
       mask_kind=st.sampled_from(["none", "bool per row", "float padding", "float per head", "large negative"]),
       contiguous=st.booleans(), path=st.sampled_from(PATHS or ["none"]), seed=st.integers(0, 10_000))
@examples(40)
def test_attention_rows_property(sequences, tokens, heads, head_dim, mask_kind, contiguous, path, seed):
    query, key, value = _rows(sequences, tokens, heads, head_dim, seed)
    if contiguous:
        query, key, value = (t.contiguous() for t in (query, key, value))
    _check(path, query, key, value, tokens, heads, mask=_masks(sequences, heads, tokens, seed)[mask_kind])


def test_other_dtypes_run_on_the_reference():
    query, key, value = (t.to(torch.bfloat16) for t in _rows(2, 5, 2, 8, seed=6))
    with qk.use_backend("cpu"):
        actual = ops.attention_rows(query, key, value, 5, 2)
    assert torch.equal(actual, reference_attention_rows(query, key, value, 5, 2))


def test_bad_input_is_a_value_error():
    query, key, value = _rows(2, 5, 2, 8, seed=7)
    cases = [
        ((query, key, value[:, :8], 5, 2), {}, "value is"),
        ((query, key.half(), value, 5, 2), {}, "key is"),
        ((query, key.double(), value, 5, 2), {}, "key must be a 2-D"),
        ((query[0], key, value, 5, 2), {}, "query must be a 2-D"),
        ((query, key, value, 3, 2), {}, "do not split into sequences of 3 tokens"),
        ((query, key, value, 5, 3), {}, "and 3 heads"),
        ((query, key, value, 0, 2), {}, "tokens must be a positive int"),
        ((query, key, value, 5, 2), {"scale": float("inf")}, "scale must be None or a finite number"),
        ((query, key, value, 5, 2), {"mask": torch.zeros(2, 2, 5, 4)}, "does not broadcast"),
        ((query, key, value, 5, 2), {"mask": torch.zeros(1, 2, 1, 2, 5, 5)}, "does not broadcast"),
        ((query, key, value, 5, 2), {"mask": torch.zeros(2, 1, 5, 5, dtype=torch.int32)}, "bool or float"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.attention_rows(*args, **kwargs)


def test_opcheck():
    """The custom op's schema and fake, and its refusal to differentiate."""
    query, key, value = _rows(2, 5, 2, 8, seed=8)
    torch.library.opcheck(torch.ops.qla.attention_rows_cpu.default,
                          (query.contiguous(), key.contiguous(), value.contiguous(), 5, 2, None, None))
    query = query.detach().requires_grad_()
    with qk.use_backend("cpu"), pytest.raises(ValueError, match="has no gradient"):
        ops.attention_rows(query, key, value, 5, 2).sum().backward()
