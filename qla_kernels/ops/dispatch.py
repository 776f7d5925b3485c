"""Backend selection: one switch, read at every op call.

Backends:
- "reference": integer-exact PyTorch (ops/reference.py), the oracle; default on CPU.
- "simulate": differentiable fake quantization in floating point, numerically the deployed model
  (ops/simulate.py); what calibration and adapter training run against.
- "triton": the Triton kernels (ops/triton/); on CPU tensors only under TRITON_INTERPRET=1.
- "cuda": the `qla_kernels._C` kernels (per-token quantization; the W4A16 GEMM at M <= 16, where
  decode is bandwidth-bound), then Triton for the ops and shapes `_C` does not implement.
An op a selected backend does not implement (a format, a rank) runs on "reference".

The default ("auto") picks per call by the input's device: "cuda" (or "triton" without `_C`) on
CUDA tensors, "reference" elsewhere. Set it with `use_backend(...)` (a context manager, thread-local)
or the QLA_BACKEND environment variable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import threading
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

BACKENDS = ("reference", "simulate", "triton", "cuda")
_AUTO = "auto"
_state = threading.local()


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: Optional[str]  # why it is unavailable, or None

    def __str__(self) -> str:
        return f"{self.name}: " + ("available" if self.available else f"unavailable ({self.reason})")


@functools.lru_cache(maxsize=None)
def _cuda_extension_status():
    """(module or None, reason it is missing)."""
    try:
        from .. import _C  # noqa: F401  (built by setup.py when nvcc was found)
    except ImportError as error:
        info_path = Path(__file__).resolve().parent.parent / "_build_info.json"
        if info_path.exists():
            reason = json.loads(info_path.read_text()).get("reason")
            if reason:
                return None, f"qla_kernels._C was not built: {reason}"
        return None, f"qla_kernels._C could not be imported: {error}"
    return _C, None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one for a bare "cuda"); 0 elsewhere."""
    if device.type != "cuda":
        return 0
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def interpreting() -> bool:
    """Triton kernels run in Triton's CPU interpreter (read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> Dict[str, BackendInfo]:
    """Every backend with whether it can run here and, if not, why."""
    return dict(_backend_table())


@functools.lru_cache(maxsize=None)
def _backend_table() -> Dict[str, BackendInfo]:
    """Computed once: resolve_backend asks on every op call, and availability does not change."""
    _, missing = _cuda_extension_status()
    if missing is None and not torch.cuda.is_available():
        missing = "qla_kernels._C is built, but torch sees no CUDA device"
    from .triton import status as triton_status

    triton_missing = triton_status()
    return {
        "reference": BackendInfo("reference", True, None),
        "simulate": BackendInfo("simulate", True, None),
        "triton": BackendInfo("triton", triton_missing is None, triton_missing),
        "cuda": BackendInfo("cuda", missing is None, missing),
    }


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
        if device.type != "cuda":
            return "reference"
        available = _backend_table()
        return next((b for b in ("cuda", "triton") if available[b].available), "reference")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got a tensor on {device}")
    if name == "triton" and device.type != "cuda" and not interpreting():
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
