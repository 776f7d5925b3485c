"""Facts about where ops run, read by every backend: the Triton interpreter switch, a CUDA
device's SM count, and whether the `qla_kernels._C` (CUDA) and `qla_kernels._cpu` (x86-64)
extensions were built and import."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch


def interpreting() -> bool:
    """Triton kernels run in Triton's CPU interpreter (read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one for a bare "cuda"); 0 elsewhere."""
    if device.type != "cuda":
        return 0
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def built_reason(key: str) -> Optional[str]:
    """Why setup.py left a module (or a part of one) out (`_build_info.json`), if it said."""
    info_path = Path(__file__).resolve().parent.parent / "_build_info.json"
    return json.loads(info_path.read_text()).get(key) if info_path.exists() else None


def _missing(name: str, reason_key: str, error: ImportError) -> str:
    """Why `qla_kernels.<name>` is missing: setup.py's reason, else the import error."""
    reason = built_reason(reason_key)
    return f"qla_kernels.{name} was not built: {reason}" if reason else f"qla_kernels.{name} could not be imported: {error}"


@functools.lru_cache(maxsize=None)
def cuda_extension() -> Tuple[Optional[object], Optional[str]]:
    """(the `_C` module or None, why it is missing)."""
    try:
        from .. import _C  # noqa: F401  (built by setup.py when nvcc was found)
    except ImportError as error:
        return None, _missing("_C", "reason", error)
    return _C, None


@functools.lru_cache(maxsize=None)
def cpu_extension() -> Tuple[Optional[object], Optional[str]]:
    """(the `_cpu` module or None, why it is missing)."""
    try:
        from .. import _cpu  # noqa: F401  (built by setup.py with the host C++ compiler)
    except ImportError as error:
        return None, _missing("_cpu", "cpu_reason", error)
    return _cpu, None
