import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from qla_kernels.nn.lsq_linear import LSQLinear
from qla_kernels import ops
from qla_kernels.ops.simulate import round_ste
from qla_kernels.quant.lsq import LSQPlusQuantizer, lsq_linear
from qla_kernels.quant.primitives import qrange


def _naive(x, weight, bias, scale, zero, bits):
    """LSQ+ as the papers write it, by autograd: x̂ = s·(round(clamp(x/s + z)) − z), STE rounding."""
    lo, hi = qrange(bits)
    zero_int = 0.0 if zero is None else round_ste(zero).clamp(lo, hi)
    codes = round_ste((x / scale + zero_int).clamp(lo, hi)) - zero_int
    return F.linear(codes * scale, weight, bias)


def _leaves(tokens, features, outputs, symmetric, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, features, generator=generator) * 2 + 0.5).requires_grad_()
    weight = torch.randn(outputs, features, generator=generator).requires_grad_()
    bias = torch.randn(outputs, generator=generator).requires_grad_()
    scale = torch.tensor(0.3, requires_grad=True)
    zero = None if symmetric else torch.tensor(-1.3, requires_grad=True)
    return x, weight, bias, scale, zero


@given(bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans(), tokens=st.integers(1, 9),
       features=st.integers(1, 24), outputs=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_lsq_linear_matches_autograd_of_the_naive_quantizer(bits, symmetric, tokens, features, outputs, seed):
    leaves = _leaves(tokens, features, outputs, symmetric, seed)
    y = lsq_linear(*leaves, bits)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)
    naive_leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    y_naive = _naive(*naive_leaves, bits)
    naive = torch.autograd.grad(y_naive, [t for t in naive_leaves if t is not None], grad_y)
    torch.testing.assert_close(y, y_naive, rtol=1e-5, atol=1e-5)
    g = 1 / math.sqrt(tokens * features * qrange(bits)[1])
    expected = list(naive[:3]) + [n * g for n in naive[3:]]  # LSQ's gradient scale on step and zero
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_codes_are_the_kernels_static_activation_codes():
    """What training sees is what the deployed kernel computes: q − z at ≤ 7 bits, exactly."""
    for bits in (4, 8):
        quantizer = LSQPlusQuantizer(bits)
        quantizer.initialize(0.07, -3)
        with torch.no_grad():
            quantizer.zero.add_(0.3)  # a trained, non-integer zero point rounds to -3 in use
        x = torch.randn(33, 16) * 0.5
        codes = quantizer.codes(x)
        kernel, _, _ = ops.quantize_activation(x, bits, static_scale=quantizer.scale.detach().reshape(1),
                                               zero_point=quantizer.integer_zero().reshape(1))
        expected = codes if bits == 8 else (codes.short() - quantizer.integer_zero()).to(torch.int8)
        assert torch.equal(kernel, expected)


def test_lsq_linear_saves_only_the_input_and_weight():
    layer = LSQLinear(16, 8, True, bits=4)
    layer.input_quantizer.initialize(0.1, 2)
    x = torch.randn(5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t.numel() > 1 and t is not layer.weight)
    assert activation_bytes == x.numel() * x.element_size()


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        LSQPlusQuantizer(9)
    quantizer = LSQPlusQuantizer(4, symmetric=True)
    with pytest.raises(ValueError, match="zero point"):
        quantizer.initialize(0.1, 1)
    with pytest.raises(ValueError, match="positive"):
        quantizer.initialize(0.0)
    with pytest.raises(ValueError, match="zero must be"):
        LSQPlusQuantizer(4).initialize(0.1, 9)
