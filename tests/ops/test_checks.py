"""Bad input raises ValueError naming the argument, before any backend runs."""

import dataclasses

import pytest
import torch

from qla_kernels import ops

from .helpers import random_int8, random_weight


def _call(**overrides):
    weight = overrides.pop("weight", random_weight("int8", 16, 32))
    a, a_scale = random_int8(4, 32)
    args = dict(a=a, a_scale=a_scale, weight=weight)
    args.update(overrides)
    return ops.fused_linear(args.pop("a"), args.pop("a_scale"), args.pop("weight"), **args)


@pytest.mark.parametrize("overrides, match", [
    (dict(a=torch.randn(4, 32)), "a must have dtype"),
    (dict(a=torch.zeros(4, 48, dtype=torch.int8)), "in_features=32"),
    (dict(a=torch.zeros(32, 4, dtype=torch.int8).t()), "a must be contiguous|in_features"),
    (dict(a=torch.zeros(4, 64, dtype=torch.int8)[:, ::2]), "a must be contiguous"),
    (dict(a=torch.zeros(4, 32, dtype=torch.int8, device="meta")), "weight is on cpu, expected meta"),
    (dict(a_scale=None), "a_scale is required"),
    (dict(a_scale=torch.ones(3)), r"a_scale must have shape \(4,\) or \(1,\)"),
    (dict(a_scale=torch.ones(4, dtype=torch.float16)), "a_scale must have dtype"),
    (dict(a_zero_point=torch.zeros(1, dtype=torch.int8)), "weight_colsum is required"),
    (dict(lowrank_t=torch.randn(4, 16)), "lowrank_t and lowrank_u must be given together"),
    (dict(lowrank_t=torch.randn(4, 16), lowrank_u=torch.randn(16, 8)), r"lowrank_u must have shape \(16, 16\)"),
    (dict(lowrank_t=torch.randn(5, 16), lowrank_u=torch.randn(16, 16)), r"lowrank_t must have shape \(4, \*\)"),
    (dict(fullrank_x=torch.randn(4, 8), fullrank_w=torch.randn(15, 8)), "fullrank_w must have shape"),
    (dict(bias=torch.randn(15)), "bias must have shape"),
    (dict(bias=torch.zeros(16, dtype=torch.int32)), "bias must have dtype"),
    (dict(activation="hardswish"), "activation must be one of"),
    (dict(residual_before_activation=True), "needs a residual"),
    (dict(residual_before_activation=1, residual=torch.zeros(4, 16)), "must be a bool"),
    (dict(activation="swiglu", residual=torch.randn(4, 16)), r"residual must have shape \(4, 8\)"),
    (dict(out_dtype=torch.int8), "out_dtype must be one of"),
    (dict(requant_bits=9), "requant_bits must be an int in"),
])
@pytest.mark.parametrize("backend", ["reference", "triton", "simulate", "cpu"])
def test_fused_linear_rejects(overrides, match, backend):
    """The same ValueError whichever backend is selected: the host checks run before dispatch."""
    if not ops.backends()[backend].available:
        pytest.skip(ops.backends()[backend].reason)
    with ops.use_backend(backend), pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_weight_buffers_are_checked():
    weight = random_weight("int4_int8_groups", 16, 64, group=32)
    with pytest.raises(ValueError, match="weight_group_scale must have shape"):
        _call(a=torch.zeros(4, 64, dtype=torch.int8),
              weight=dataclasses.replace(weight, group_scale=weight.group_scale[:, :1].contiguous()))
    with pytest.raises(ValueError, match="weight_scale must have dtype torch.float32"):
        _call(weight=dataclasses.replace(random_weight("int8", 16, 32), scale=torch.ones(16, dtype=torch.float16)))
    with pytest.raises(ValueError, match="weight_format must be one of"):
        _call(weight=dataclasses.replace(random_weight("int8", 16, 32), format="int3"))
    w4a16 = random_weight("uint4_asym_groups", 16, 64, group=32)
    with pytest.raises(ValueError, match="a_scale and a_zero_point must be None"):
        _call(a=torch.randn(4, 64), weight=w4a16)
    with pytest.raises(ValueError, match="a must have dtype"):
        _call(a=torch.zeros(4, 64, dtype=torch.int8), a_scale=None, weight=w4a16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.zeros(4, 32, dtype=torch.int8)), "x must have dtype"),
    (dict(x=torch.randn(2, 4, 32)), "x must be 2-D"),
    (dict(x=torch.randn(32, 4).t()), "x must be contiguous"),
    (dict(bits=9), "bits must be an int"),
    (dict(bits=1), "bits must be an int"),
    (dict(zero_point=torch.zeros(1, dtype=torch.int8)), "zero_point requires static_scale"),
    (dict(static_scale=torch.ones(4)), r"static_scale must have shape \(1,\)"),
    (dict(norm_kind="batchnorm"), "norm_kind must be one of"),
    (dict(norm_weight=torch.ones(32)), "norm_weight was given but norm_kind is 'none'"),
    (dict(norm_kind="rmsnorm", norm_bias=torch.ones(32)), "norm_bias must be None"),
    (dict(norm_kind="layernorm", norm_weight=torch.ones(31)), "norm_weight must have shape"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(down_proj=torch.randn(31, 8)), "down_proj must have shape"),
])
def test_quantize_activation_rejects(kwargs, match):
    x = kwargs.pop("x", torch.randn(4, 32))
    bits = kwargs.pop("bits", 8)
    with pytest.raises(ValueError, match=match):
        ops.quantize_activation(x, bits, **kwargs)
