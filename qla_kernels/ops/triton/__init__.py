"""The Triton backend: fused int8-activation GEMM and the activation pre-kernel as custom ops.

Available when triton imports and either a CUDA device is present or TRITON_INTERPRET=1 (the CPU
interpreter CI uses). Importing this package registers `qla::fused_linear_triton` and
`qla::quantize_activation_triton` when triton is importable.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..device import interpreting
from ..dispatch import register, register_backend
from ..operands import fused_linear_custom_op, refuse_backward
from ..library import (
    attention_fake,
    dwsep_down_fake,
    fused_linear_fake,
    normalize_activation_fake,
    normalize_quantize_activation_fake,
    quantize_activation_fake,
    quantize_activation_into_fake,
)

try:
    import triton  # noqa: F401
except ImportError as error:  # pragma: no cover - triton ships with CUDA builds of torch
    _IMPORT_ERROR: Optional[str] = f"triton is not installed ({error})"
else:
    _IMPORT_ERROR = None


def status() -> Optional[str]:
    """None when the Triton backend can run here, else why not."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    return None


if _IMPORT_ERROR is None:
    from . import launch
    from .kernel_launch import is_planning
    from .launch import TRITON_WEIGHT_FORMATS, rotation_of, supports_dwsep_down, supports_quantize_activation

    def _fake_or_planned(fake, body):
        """The op's fake; while launches are planned (kernel_launch.planning: meta tensors), the
        launch code itself, which records its launches and returns outputs of the same shapes."""
        def run(*args, **kwargs):
            return body(*args, **kwargs) if is_planning() else fake(*args, **kwargs)
        return run

    def _register(name: str, body, fake, mutates_args=()):
        op = torch.library.custom_op(f"qla::{name}", mutates_args=mutates_args)(body)
        op.register_fake(_fake_or_planned(fake, body))
        if not mutates_args:
            refuse_backward(op)
        return op

    def _quantize_activation(
        x: Tensor, bits: int, static_scale: Optional[Tensor], zero_point: Optional[Tensor], norm_kind: str,
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], norm_eps: float, down_proj: Optional[Tensor],
        down_from_input: bool = False, rotate: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return launch.quantize_activation(
            x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj,
            down_from_input=down_from_input, rotate=rotate,
        )

    def _quantize_activation_into(
        x: Tensor, bits: int, static_scale: Optional[Tensor], zero_point: Optional[Tensor], norm_kind: str,
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], norm_eps: float, down_proj: Tensor, t_out: Tensor,
        down_from_input: bool = False, rotate: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        q, scale, _ = launch.quantize_activation(
            x, bits, static_scale, zero_point, norm_kind, norm_weight, norm_bias, norm_eps, down_proj, t_out,
            down_from_input=down_from_input, rotate=rotate,
        )
        return q, scale

    def _normalize_activation(
        x: Tensor, norm_kind: str, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], norm_eps: float,
        down_proj: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor]:
        return launch.normalize_activation(x, norm_kind, norm_weight, norm_bias, norm_eps, down_proj)

    def _normalize_quantize_activation(
        x: Tensor, bits: int, static_scale: Optional[Tensor], zero_point: Optional[Tensor], norm_kind: str,
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], norm_eps: float, down_proj: Optional[Tensor],
        down_from_input: bool = False, rotate: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return launch.normalize_quantize_activation(x, bits, static_scale, zero_point, norm_kind, norm_weight,
                                                    norm_bias, norm_eps, down_proj, down_from_input, rotate)

    def _dwsep_down(h: Tensor, height: int, width: int, prefix_tokens: int, dw_weight: Tensor,
                    dw_bias: Optional[Tensor], down_weight: Tensor, down_bias: Optional[Tensor],
                    token_mask: Optional[Tensor]) -> Tensor:
        return launch.dwsep_down(h, height, width, prefix_tokens, dw_weight, dw_bias, down_weight, down_bias)

    fused_linear = fused_linear_custom_op("qla::fused_linear_triton", launch.fused_linear,
                                          _fake_or_planned(fused_linear_fake, launch.fused_linear))
    quantize_activation = _register("quantize_activation_triton", _quantize_activation, quantize_activation_fake)
    quantize_activation_into = _register("quantize_activation_into_triton", _quantize_activation_into,
                                         quantize_activation_into_fake, mutates_args=("t_out",))
    normalize_activation = _register("normalize_activation_triton", _normalize_activation, normalize_activation_fake)
    normalize_quantize_activation = _register("normalize_quantize_activation_triton", _normalize_quantize_activation,
                                              normalize_quantize_activation_fake)
    dwsep_down = _register("dwsep_down_triton", _dwsep_down, dwsep_down_fake)
    def _quantized_attention(query: Tensor, key: Tensor, value: Tensor, bits: int, scales: Tensor,
                             zeros: Optional[Tensor], scaling: float, mask: Optional[Tensor]) -> Tensor:
        return launch.quantized_attention(query, key, value, bits, scales, zeros, scaling, mask)

    quantized_attention = _register("quantized_attention_triton", _quantized_attention, attention_fake)

    def _log2_attention(query: Tensor, key: Tensor, value: Tensor, bits: int, scaling: float,
                        mask: Optional[Tensor]) -> Tensor:
        return launch.quantized_attention(query, key, value, bits, None, None, scaling, mask, tokenwise_log2=True)

    log2_attention = _register("log2_attention_triton", _log2_attention, attention_fake)

    def _covered_by(predicate, op: str, *arguments: str):
        """`predicate` of the call's `arguments` (their defaults where the call stops short), found
        by name in the reference op's schema."""
        schema = getattr(torch.ops.qla, op).default._schema.arguments
        names = [item.name for item in schema]
        picks = [(names.index(name), schema[names.index(name)].default_value) for name in arguments]
        return lambda *args: predicate(*(args[index] if index < len(args) else default for index, default in picks))

    # What the kernels cover; the registry runs the rest on the reference (a rotation of a width
    # `rotation_of` refuses: a power of two below 256, or a row too wide for the rotating tile).
    def _rotation_covered(x, rotate) -> bool:
        return not rotate or rotation_of(x.shape[-1]) is not None

    for _op in ("quantize_activation", "quantize_activation_into", "normalize_activation",
                "normalize_quantize_activation"):
        covered = (_covered_by(supports_quantize_activation, _op, "down_proj") if _op == "normalize_activation" else
                   _covered_by(lambda x, down_proj, rotate: _rotation_covered(x, rotate)
                               and supports_quantize_activation(down_proj), _op, "x", "down_proj", "rotate"))
        register(_op, "triton", getattr(torch.ops.qla, f"{_op}_triton"), covered,
                 body=_quantize_activation if _op == "quantize_activation" else None)
    hadamard_rotate = _register("hadamard_rotate_triton", launch.hadamard_rotate, lambda x: torch.empty_like(x))
    register("hadamard_rotate", "triton", torch.ops.qla.hadamard_rotate_triton,
             lambda x: rotation_of(x.shape[-1]) is not None, body=launch.hadamard_rotate)
    register("dwsep_down", "triton", torch.ops.qla.dwsep_down_triton,
             lambda *args: supports_dwsep_down(args[6], args[8]))  # down_weight, token_mask
    register("quantized_attention", "triton", torch.ops.qla.quantized_attention_triton)
    register("log2_attention", "triton", torch.ops.qla.log2_attention_triton)
    register("fused_linear", "triton", lambda operands: torch.ops.qla.fused_linear_triton(*operands),
             lambda operands: operands.weight_format in TRITON_WEIGHT_FORMATS,
             body=launch.fused_linear)
    # A convolution takes its plan (not a custom op's tensors): its GEMMs are the kernel's launches.
    register("conv_gemm", "triton", launch.conv_gemm, launch.supports_conv_gemm)

register_backend("triton", status)

if _IMPORT_ERROR is not None:  # pragma: no cover
    TRITON_WEIGHT_FORMATS = ()

    def supports_quantize_activation(down_proj) -> bool:
        return False

    def supports_dwsep_down(down_weight, token_mask) -> bool:
        return False
