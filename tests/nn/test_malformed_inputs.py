"""Bad input through the public API is a ValueError naming what is wrong, and a failed
`quantize_` leaves the model as it was."""

import copy

import pytest
import torch
from torch import nn

import qla_kernels as qk

LAYER = dict(config=qk.W8A8())


def _layer():
    return qk.QuantLinear.from_float(nn.Linear(8, 8), qk.W8A8())


MALFORMED = {
    "W8A8 takes no group size": (lambda: qk.W8A8(group_size=32), "W8A8 takes rotate; got group_size="),
    "W4A8 takes two arguments": (lambda: qk.W4A8(32, None, 5), "W4A8 takes group_size, rotate"),
    "W4A8 rotate is a name": (lambda: qk.W4A8(32, 5), "W4A8.rotate must be one of"),
    "unknown field in a stored config": (lambda: qk.QuantConfig.from_dict({"name": "W4A16", "bits": 3}),
                                         "W4A16 takes group_size"),
    "group size not a multiple of 16": (lambda: qk.W4A16(group_size=24), "multiple of 16"),
    "negative in_features": (lambda: qk.QuantLinear(-2, 4, **LAYER), "in_features must be a positive int"),
    "float in_features": (lambda: qk.QuantLinear(32.0, 4, **LAYER), "in_features must be a positive int"),
    "zero out_features": (lambda: qk.QuantLinear(8, 0, **LAYER), "out_features must be a positive int"),
    "bool in_features": (lambda: qk.QuantLinear(True, 4, **LAYER), "in_features must be a positive int"),
    "no config": (lambda: qk.QuantLinear(8, 4), "config must be a QuantConfig"),
    "two static scales": (lambda: _layer().set_static_activation(torch.tensor([0.1, 0.2])), "one number"),
    "two zero points": (lambda: _layer().set_static_activation(0.1, torch.tensor([1, 2])), "one integer"),
    "a string scale": (lambda: _layer().set_static_activation("a"), "numbers or tensors"),
    "a list for x": (lambda: _layer()([[1.0] * 8]), "x must be a float16/bfloat16/float32 tensor"),
    "no features to quantize": (lambda: qk.ops.quantize_activation(torch.randn(3, 0)), "no features"),
    "quantize_ of a tensor": (lambda: qk.quantize_(torch.randn(3), qk.W8A8()), "must be a torch.nn.Module"),
    "quantize_ with no config": (lambda: qk.quantize_(nn.Sequential(nn.Linear(8, 8)), "w8a8"), "config must be"),
    "quantize_ selecting nothing": (lambda: qk.quantize_(nn.Sequential(nn.Linear(8, 8)), qk.W8A8(),
                                                         filter_fn=lambda module, name: False), "no linear layer"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_a_value_error_naming_it(case):
    call, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_a_failed_quantize_leaves_the_model_as_it_was():
    """The second linear cannot take W4A16's groups of 32 (K = 48): nothing is swapped."""
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot quantize '2'"):
        qk.quantize_(model, qk.W4A16(group_size=32))
    assert [type(module) for module in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_linear_registered_twice_stays_one_module():
    shared = nn.Linear(16, 16)
    model = nn.Module()
    model.first, model.second = shared, shared
    qk.quantize_(model, qk.W8A8())
    assert isinstance(model.first, qk.QuantLinear) and model.second is model.first


def test_quantizing_a_quantized_model_again_says_so():
    model = qk.quantize_(nn.Sequential(nn.Linear(16, 16)), qk.W8A8())
    with pytest.raises(ValueError, match="already quantized"):
        qk.quantize_(model, qk.W4A8())


def test_backward_through_the_integer_backends_says_to_use_simulate():
    layer = _layer()
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="simulate"):
        layer(x).sum().backward()
    with qk.use_backend("simulate"):
        layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_bad_zero_point_changes_nothing():
    layer = _layer()
    with pytest.raises(ValueError, match="zero_point must be an integer"):
        layer.set_static_activation(0.1, 200)
    assert layer.input_scale is None and layer.input_zero_point is None


def test_an_empty_batch_runs_alike_on_every_path():
    """dwsep_down on batch 0 (the reference used to fail on it while the kernels did not)."""
    t = qk.ops.dwsep_down(torch.randn(0, 5, 8), 2, 2, 1, torch.randn(8, 9), torch.randn(8), torch.randn(4, 8))
    assert t.shape == (0, 4)
