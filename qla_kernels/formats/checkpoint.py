"""Single-file safetensors checkpoints with JSON metadata in the header (no pickle).

safetensors refuses tensors that share storage (tied weights); those are written once and the
other names recorded under the header key "qla.aliases" ({alias: stored name}).
"""

from __future__ import annotations

import json
from typing import Dict, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_ALIASES = "qla.aliases"


def write_checkpoint(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, object]) -> None:
    """Writes `tensors` and JSON-serializable `metadata` (one header entry per key)."""
    stored: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[Tuple[int, int, int, torch.dtype, Tuple[int, ...], Tuple[int, ...]], str] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype,
               tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = tensor.contiguous().cpu().clone()
    header = {key: json.dumps(value) for key, value in metadata.items()}
    header[_ALIASES] = json.dumps(aliases)
    save_file(stored, path, metadata=header)


def read_checkpoint(path: str, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """(tensors with aliases restored, metadata) of a file written by write_checkpoint. A file that
    is not one (unreadable, truncated, foreign header entries, aliases to missing tensors) is a
    ValueError saying what is wrong."""
    try:
        with safe_open(path, framework="pt", device=device) as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    if _ALIASES not in header:
        raise ValueError(f"{path} is not a qla_kernels checkpoint (no {_ALIASES!r} header entry)")
    metadata = {}
    for key, value in header.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: header entry {key!r} is not JSON (not written by qla_kernels)") from None
    aliases = metadata.pop(_ALIASES)
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
        raise ValueError(f"{path}: {_ALIASES!r} must map names to stored tensors")
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors, metadata
