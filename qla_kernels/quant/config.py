"""Quantization configs: small frozen dataclasses validated at construction.

Each config fixes the weight format a QuantLinear stores and how its input is quantized:

| config                 | weights                                          | activations              |
|------------------------|--------------------------------------------------|--------------------------|
| W8A8()                 | int8, symmetric per output channel               | int8 per token (dynamic) |
| W4A4()                 | 4-bit values in int8, symmetric per channel      | 4-bit values in int8     |
| W4A8(group_size=None)  | int4 packed, symmetric per channel               | int8 per token           |
| W4A8(group_size=G)     | int4 packed with integer group scales (QServe)   | int8 per token           |
| W4A16(group_size=G)    | uint4 packed, asymmetric scale + zero per group  | fp16/bf16 unquantized    |

`group_size=None` means one group per output channel (per-channel quantization).
`rotate="hadamard"` (the activation-quantized configs): the layer computes Q(x·R)·Q(W·R)ᵀ with a
randomized Hadamard R (quant/hadamard.py), W·R quantized once, x·R before each activation
quantization.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch

from .hadamard import ROTATIONS, check_rotatable, rotate


def _check_group_size(config_name: str, group_size) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"{config_name}.group_size must be an int or None, got {group_size!r}")
    if group_size < 16 or group_size % 16:
        raise ValueError(
            f"{config_name}.group_size must be a positive multiple of 16 (the kernels' K tile), "
            f"got {group_size}"
        )


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base of the quantization configs; use one of the concrete subclasses."""

    weight_bits: ClassVar[int]
    act_bits: ClassVar[Optional[int]]  # None: activations stay in floating point
    weight_format: ClassVar[str]

    def __new__(cls, *args, **kwargs):
        # Arguments the config does not take are a ValueError naming them (the dataclass's own
        # __init__ would raise a TypeError).
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = [name for name in kwargs if name not in names]
        if len(args) > len(names) or unknown:
            taken = ", ".join(names) if names else "no arguments"
            given = [*map(repr, args), *(f"{name}=" for name in kwargs)]
            raise ValueError(f"{cls.__name__} takes {taken}; got {', '.join(given)}")
        return super().__new__(cls)

    @property
    def group_size(self) -> Optional[int]:
        return None

    def check_in_features(self, in_features: int, where: str = "in_features") -> None:
        """Raises ValueError when a linear with `in_features` inputs cannot use this config."""
        group = self.group_size
        if group is not None and in_features % group:
            raise ValueError(
                f"{where}={in_features} is not a multiple of {type(self).__name__}.group_size={group}"
            )
        if self.weight_format != "int8" and in_features % 2:
            raise ValueError(f"{where}={in_features} must be even to pack two int4 weights per byte")
        if self.rotate is not None:
            check_rotatable(in_features, where)

    @property
    def rotate(self) -> Optional[str]:
        return None

    def rotated(self, t: torch.Tensor) -> torch.Tensor:
        """t·R over its last dimension when this config rotates (quant/hadamard.py), else t: what
        a layer's activation quantizer sees of its input, and the weight it stores."""
        return rotate(t) if self.rotate else t

    def _shown(self):
        """The fields to print and store: an option left off (rotate=None) is not written, so
        files and names from before it existed stay as they were."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.metadata.get("optional") and getattr(self, f.name) is None)]

    def to_dict(self) -> dict:
        return {"name": type(self).__name__, **dict(self._shown())}

    @staticmethod
    def from_dict(data: dict) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a stored quantization config is a dict such as {{'name': 'W8A8'}}, got {data!r}")
        data = dict(data)
        name = data.pop("name", None)
        configs = {cls.__name__: cls for cls in (W8A8, W4A4, W4A8, W4A16)}
        if name not in configs:
            raise ValueError(f"unknown quantization config name {name!r}; expected one of {sorted(configs)}")
        return configs[name](**data)

    def __str__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
                           for name, value in self._shown())
        return f"{type(self).__name__}({fields})"


def _rotate_field():
    return dataclasses.field(default=None, metadata={"optional": True})


def _check_rotate(config_name: str, rotate) -> None:
    if rotate not in ROTATIONS:
        raise ValueError(f"{config_name}.rotate must be one of {ROTATIONS}, got {rotate!r}")


@dataclasses.dataclass(frozen=True)
class W8A8(QuantConfig):
    """int8 weights per output channel, int8 activations per token, int32 accumulation."""

    rotate: Optional[str] = _rotate_field()
    weight_bits: ClassVar[int] = 8
    act_bits: ClassVar[Optional[int]] = 8
    weight_format: ClassVar[str] = "int8"

    def __post_init__(self):
        _check_rotate("W8A8", self.rotate)


@dataclasses.dataclass(frozen=True)
class W4A4(QuantConfig):
    """4-bit weights and activations, both stored in int8 so int8 tensor cores run them exactly."""

    rotate: Optional[str] = _rotate_field()
    weight_bits: ClassVar[int] = 4
    act_bits: ClassVar[Optional[int]] = 4
    weight_format: ClassVar[str] = "int8"

    def __post_init__(self):
        _check_rotate("W4A4", self.rotate)


@dataclasses.dataclass(frozen=True)
class W4A8(QuantConfig):
    """int4 weights (packed) with int8 per-token activations.

    group_size=None: one fp32 scale per output channel. group_size=G: QServe-style two levels,
    an fp32 scale per channel and an int8 scale per group of G inputs, so the kernel rebuilds int8
    weights with an integer multiply and keeps a single int32 accumulator over the whole K loop.
    """

    group_size: Optional[int] = None
    rotate: Optional[str] = _rotate_field()
    weight_bits: ClassVar[int] = 4
    act_bits: ClassVar[Optional[int]] = 8

    def __post_init__(self):
        _check_group_size("W4A8", self.group_size)
        _check_rotate("W4A8", self.rotate)

    @property
    def weight_format(self) -> str:
        return "int4" if self.group_size is None else "int4_int8_groups"


@dataclasses.dataclass(frozen=True)
class W4A16(QuantConfig):
    """Weight-only int4: unsigned 4-bit codes with an fp32 scale and an integer zero per group."""

    group_size: Optional[int] = 128
    weight_bits: ClassVar[int] = 4
    act_bits: ClassVar[Optional[int]] = None
    weight_format: ClassVar[str] = "uint4_asym_groups"

    def __post_init__(self):
        _check_group_size("W4A16", self.group_size)
