import os
import platform
import shutil

import pytest
import torch

import qla_kernels as qk
from qla_kernels import ops
from qla_kernels.ops import dispatch, requested_backend, resolve_backend
from qla_kernels.ops.device import cpu_extension

from .helpers import random_weight


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


def test_auto_is_the_cpu_backend_on_cpu_where_it_is_built():
    expected = "cpu" if dispatch.backends()["cpu"].available else "reference"
    assert resolve_backend(torch.device("cpu")) == expected


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


def _operands(fmt: str, rank: int = 0) -> "ops.FusedLinearOperands":
    weight = random_weight(fmt, 32, 64, group=32)
    a = torch.zeros(4, 64, dtype=torch.int8) if fmt != "uint4_asym_groups" else torch.zeros(4, 64)
    return ops.FusedLinearOperands(
        a, torch.ones(4) if fmt != "uint4_asym_groups" else None, None, weight.data, weight.format, weight.scale,
        weight.group_scale, weight.zero, weight.k_group, None, None, None, None, None, None, "none", None,
        torch.float32, 0, None, None, 4)


def test_every_op_resolves_through_its_chain_to_the_first_implementation_that_covers_the_call():
    """A selected backend tries its chain (cuda, then triton, then the reference); the reference
    covers every call, and a call a kernel does not cover (a pre-kernel rank above 128) goes on
    down the chain."""
    cpu = torch.device("cpu")
    auto = "cpu" if dispatch.backends()["cpu"].available else "reference"
    assert dispatch.implementation("fused_linear", cpu, _operands("int8")).backend == auto  # auto on CPU
    with dispatch.selecting("triton"):
        if dispatch.backends()["triton"].available:  # the interpreter (CI)
            assert dispatch.implementation("fused_linear", cpu, _operands("int4")).backend == "triton"
            x = torch.zeros(4, 64)
            for rank, backend in ((128, "triton"), (136, "reference")):
                args = (x, 8, None, None, "none", None, None, 1e-5, torch.zeros(64, rank), False)
                assert dispatch.implementation("quantize_activation", cpu, *args).backend == backend
    with dispatch.selecting("simulate"):  # the integer ops of the simulated model are the reference's
        assert dispatch.implementation("fused_linear", cpu, _operands("int8")).backend == "reference"


def test_registering_twice_or_an_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="already has a 'reference' implementation"):
        dispatch.register("fused_linear", "reference", lambda operands: None)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        dispatch.register("fused_linear", "tensorrt", lambda operands: None)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None
                    or bool(os.environ.get("QLA_SKIP_CPU")), reason="no x86-64 host C++ compiler")
def test_the_cpu_extension_is_built_where_a_compiler_exists():
    """A failed build of `_cpu` leaves the package installable, and every CPU-kernel test skips:
    this one does not."""
    module, missing = cpu_extension()
    assert module is not None, missing
