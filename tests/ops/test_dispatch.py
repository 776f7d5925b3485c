import pytest
import torch

import qla_kernels as qk
from qla_kernels.ops import requested_backend, resolve_backend


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        with qk.use_backend("tensorrt"):
            pass


def test_use_backend_nests_and_restores():
    assert requested_backend() == "auto"
    with qk.use_backend("simulate"):
        assert resolve_backend(torch.device("cpu")) == "simulate"
        with qk.use_backend("reference"):
            assert requested_backend() == "reference"
        assert requested_backend() == "simulate"
    assert requested_backend() == "auto"


def test_auto_is_reference_on_cpu():
    assert resolve_backend(torch.device("cpu")) == "reference"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("QLA_BACKEND", "simulate")
    assert resolve_backend(torch.device("cpu")) == "simulate"
    monkeypatch.setenv("QLA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        resolve_backend(torch.device("cpu"))


def test_backends_say_why_not():
    info = qk.backends()
    assert info["reference"].available and info["simulate"].available
    if not torch.cuda.is_available():
        assert not info["cuda"].available and info["cuda"].reason
        with pytest.raises(RuntimeError, match="cuda: unavailable"):
            with qk.use_backend("cuda"):
                pass
