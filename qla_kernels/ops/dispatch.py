"""Backend selection and the registry of op implementations.

Backends:
- "reference": integer-exact PyTorch (ops/reference.py), the oracle.
- "simulate": differentiable fake quantization in floating point, numerically the deployed model
  (ops/simulate.py); what calibration and adapter training run against. Its integer ops run on
  the reference.
- "triton": the Triton kernels (ops/triton/); on CPU tensors only under TRITON_INTERPRET=1.
- "cuda": the `qla_kernels._C` kernels (per-token quantization; the W4A16 GEMM at M <= 16, where
  decode is bandwidth-bound), then Triton for the ops and shapes `_C` does not implement.
- "cpu": the `qla_kernels._cpu` x86-64 kernels (ops/cpu.py: the integer fused linear and the
  per-token quantizer), then the reference; default on CPU when it is built.

Each backend module registers its availability (`register_backend`) and, per op, what it
implements with a `supports(*args)` predicate (`register`). A selected backend runs an op on the
first implementation of its chain (`_CHAINS`: cuda, then triton, then the reference) whose
predicate accepts the call; the reference accepts every call, so an op or shape a kernel does not
implement (a format, a rank) runs on the reference. A new backend is one `register_backend`, its
`register` calls, and its line in `_CHAINS` (and in `_AUTO_CHOICES` where it is a device's default).

The default ("auto") picks per call by the input's device: "cuda" (or "triton" without `_C`) on
CUDA tensors, "cpu" on CPU tensors (where `_cpu` is built), "reference" elsewhere; a graph that
torch.compile traced keeps the backend it picked then (`_auto_backend` is a constant of it). Set it with `use_backend(...)` (a context manager, thread-local)
or the QLA_BACKEND environment variable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import device as device_facts

BACKENDS = ("reference", "simulate", "triton", "cuda", "cpu")
_AUTO = "auto"
# Per selected backend, the backends whose implementations an op tries, in order.
_CHAINS = {"reference": ("reference",), "simulate": ("reference",), "triton": ("triton", "reference"),
           "cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Per device type, the backends "auto" takes, the first available one (else the reference).
_AUTO_CHOICES = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
_state = threading.local()


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: Optional[str]  # why it is unavailable, or None
    detail: Optional[str] = None  # what an available backend runs on (the CPU backend's path)

    def __str__(self) -> str:
        if not self.available:
            return f"{self.name}: unavailable ({self.reason})"
        return f"{self.name}: available" + (f" ({self.detail})" if self.detail else "")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op: `run(*args)`, for the calls `supports(*args)` accepts
    (None: every call). `body`, where given, is what the custom op `run` calls, with the same
    arguments: `eager(first)` returns it for calls that need nothing of the dispatcher."""

    backend: str
    run: Callable
    supports: Optional[Callable[..., bool]] = None
    body: Optional[Callable] = None

    def eager(self, first: torch.Tensor) -> Callable:
        """`body` when the call runs eagerly on plain tensors without autograd (the custom op adds
        some 10 µs of dispatch per call, measured at M = 1, and is there for torch.compile, fake
        tensors and its refusal to differentiate), else `run`."""
        if (self.body is None or torch.compiler.is_compiling() or torch.is_grad_enabled()
                or type(first) is not torch.Tensor or first.device.type == "meta"):
            return self.run
        return self.body


_STATUS: Dict[str, Callable[[], Optional[str]]] = {"reference": lambda: None, "simulate": lambda: None}
_DETAIL: Dict[str, Callable[[], str]] = {}
_IMPLEMENTATIONS: Dict[str, List[Implementation]] = {}
# Per op and selected backend, the implementations to try in order: built at registration, so a
# call only reads it (no cache wrapper for torch.compile to trace through).
_RESOLVED: Dict[str, Dict[str, Tuple[Implementation, ...]]] = {}


def register_backend(name: str, status: Callable[[], Optional[str]],
                     detail: Optional[Callable[[], str]] = None) -> None:
    """`status()` is None when backend `name` can run here, else why not (asked once); `detail()`
    says what an available one runs on."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    _STATUS[name] = status
    if detail is not None:
        _DETAIL[name] = detail
    _backend_table.cache_clear()


def register(op: str, backend: str, run: Callable, supports: Optional[Callable[..., bool]] = None,
             body: Optional[Callable] = None) -> None:
    """Registers `backend`'s implementation of `op` (`body`: see Implementation). One per (op, backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    entries = _IMPLEMENTATIONS.setdefault(op, [])
    if any(entry.backend == backend for entry in entries):
        raise ValueError(f"op {op!r} already has a {backend!r} implementation")
    entries.append(Implementation(backend, run, supports, body))
    by_backend = {entry.backend: entry for entry in entries}
    _RESOLVED[op] = {selected: tuple(by_backend[name] for name in chain if name in by_backend)
                     for selected, chain in _CHAINS.items()}


def implementation(op: str, device: torch.device, *args) -> Implementation:
    """The implementation `op` runs on for these (validated) arguments on `device`."""
    return implementation_for(op, resolve_backend(device), *args)


def implementation_for(op: str, backend: str, *args) -> Implementation:
    """The implementation `op` runs on for these (validated) arguments when `backend` (a
    `resolve_backend` result) is selected: a caller running several ops resolves once."""
    for entry in _RESOLVED[op][backend]:
        if entry.supports is None or entry.supports(*args):
            return entry
    raise ValueError(f"op {op!r} has no reference implementation registered (qla_kernels.ops.library not imported)")


def backends() -> Dict[str, BackendInfo]:
    """Every backend with whether it can run here and, if not, why."""
    return dict(_backend_table())


@functools.lru_cache(maxsize=None)
def _backend_table() -> Dict[str, BackendInfo]:
    """Computed once: resolve_backend asks on every op call, and availability does not change."""
    table = {}
    for name in BACKENDS:
        reason = _STATUS[name]() if name in _STATUS else f"{name} is not registered (its module did not import)"
        detail = _DETAIL[name]() if reason is None and name in _DETAIL else None
        table[name] = BackendInfo(name, reason is None, reason, detail)
    return table


@torch.compiler.assume_constant_result
def _auto_backend(device_type: str) -> str:
    """The first available backend of the auto choices for `device_type`. torch.compile takes its
    result as a constant while tracing instead of tracing the availability probes (imports of
    the kernel modules, the build record), which Dynamo of torch 2.13 cannot trace."""
    choices = _AUTO_CHOICES.get(device_type)
    if not choices:
        return "reference"
    available = _backend_table()
    return next((b for b in choices if available[b].available), "reference")


def _validated(name: str) -> str:
    if name != _AUTO and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)} or 'auto'")
    return name


def requested_backend() -> str:
    """The backend set by use_backend / QLA_BACKEND, possibly 'auto'."""
    name = getattr(_state, "backend", None)
    if name is None:
        name = _validated(os.environ.get("QLA_BACKEND", _AUTO).strip().lower())
    return name


def resolve_backend(device: torch.device) -> str:
    """The concrete backend an op on `device` runs on."""
    name = requested_backend()
    if device.type == "meta":  # shapes only: every backend's op runs its fake
        return "reference" if name == _AUTO else name
    if name == _AUTO:
        return _auto_backend(device.type)
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got a tensor on {device}")
    if name == "triton" and device.type != "cuda" and not device_facts.interpreting():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {device}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on `name` ("reference", "simulate", "cuda" or "auto").

    An unknown name is a ValueError; a known backend that cannot run here is a RuntimeError
    carrying `backends()`'s reason.
    """
    _validated(name)
    if name != _AUTO and not backends()[name].available:
        raise RuntimeError(str(backends()[name]))
    with selecting(name):
        yield


@contextlib.contextmanager
def selecting(name: str) -> Iterator[None]:
    """`use_backend` without the availability check: for planning Triton launches on meta tensors
    (ops/triton/kernel_launch.py), which needs no GPU."""
    previous = getattr(_state, "backend", None)
    _state.backend = _validated(name)
    try:
        yield
    finally:
        _state.backend = previous
