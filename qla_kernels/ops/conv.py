"""Quantized 2-D convolution, channels last, on the fused linear's kernels and epilogue.

A convolution is a GEMM over its input windows: GEMM row m is output pixel (n, ho, wo), its K
index runs over the window's taps (kh, kw) and, within a tap, the input channels of the
group (the layout of `weight.permute(0, 2, 3, 1)`), and the epilogue is the fused linear's
(bias, activation, residual, T·Uᵀ, X_c·W_cᵀ, per-pixel re-quantization). A 1×1 convolution
at stride 1 is the GEMM on the pixels themselves (no gather).

Activation quantization (DESIGN.md "Numerics", applied to windows):
- dynamic: one scale per output pixel, the absmax of its whole input window (every tap, every
  channel): the per-token scale of its GEMM row. For a 1×1 convolution it is per pixel.
  Per input pixel scales would need an fp32 rescale per tap inside the K loop; one per window
  keeps a single int32 accumulator over the whole window.
- static: one scale (and zero point) per tensor; every pixel is quantized once and the codes
  gathered, padding being the code of 0 (z at 8 bits, where the GEMM subtracts z·colsum(W);
  0 below, where the codes hold q − z).

Groups: a window's codes are quantized together (one scale for all groups); group g's GEMM
reads its C/g channels of every tap and writes its O/g output channels. Depthwise
convolutions (one input channel per group) are a direct int32 tap sum instead of O/g-wide GEMMs:
memory-bound, so int8 buys their storage and the fused epilogue, not arithmetic.

Where the windows come from (`conv_gemm`, a registry op that takes the plan): the Triton backend
gathers them inside its GEMM's K loop (`ops/triton/conv_gemm.py`: static codes, or the fp
activations quantized in the loop at the window scales `window_scales` computes without
gathering) for plans whose channels per group are a multiple of 32, and runs depthwise plans
(int8 weights) on a direct kernel that reads the windows the same way; every other plan and backend
gathers them in memory (`gathered_conv_gemm`, `gather_windows`) for the fused linear. Both give
the same codes and integer sums.

Under the `simulate` backend the same windows are fake-quantized in floating point
(differentiable); `ConvPlan.run` is the integer path on the selected backend's kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..formats.weights import INTEGER_FORMATS, QuantizedWeight
from ..quant.primitives import absmax_scale, qrange
from . import reference, simulate
from .checks import FLOAT_DTYPES, check_bits, check_choice, check_fused_linear, check_quantize_activation, check_tensor
from .cpu import with_panels
from .dispatch import implementation_for, register, resolve_backend
from .operands import fused_linear_operands, gemm_zero_point


def _pair(name: str, value) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, tuple) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A convolution's window: kernel (kh, kw), stride, padding (zeros), dilation and groups."""

    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self):
        for name in ("kernel", "stride", "padding", "dilation"):
            value = _pair(name, getattr(self, name))
            if any(v < (0 if name == "padding" else 1) for v in value):
                raise ValueError(f"{name} must be {'non-negative' if name == 'padding' else 'positive'}, got {value}")
            object.__setattr__(self, name, value)
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive int, got {self.groups!r}")

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> "ConvGeometry":
        """The geometry of an nn.Conv2d (string paddings resolved; zero padding only)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (zeros only)")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # "same" at stride 1: symmetric only when the total padding is even
                total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                if any(t % 2 for t in total):
                    raise ValueError(f"padding='same' with kernel {conv.kernel_size} and dilation {conv.dilation} "
                                     "pads asymmetrically, which is not supported")
                padding = tuple(t // 2 for t in total)
        return cls(tuple(conv.kernel_size), tuple(conv.stride), tuple(padding), tuple(conv.dilation), conv.groups)

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def pointwise(self) -> bool:
        """A 1×1 convolution at stride 1 without padding: the GEMM on the pixels themselves."""
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        sizes = []
        for size, k, s, p, d in zip((height, width), self.kernel, self.stride, self.padding, self.dilation):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]


def gather_windows(x: torch.Tensor, geometry: ConvGeometry, pad_value=0) -> torch.Tensor:
    """The input windows of every output pixel: x [N, H, W, C] → [N·Ho·Wo, taps, C] (any dtype;
    padding filled with `pad_value`). A view for 1×1 convolutions at stride 1."""
    batch, height, width, channels = x.shape
    out_h, out_w = geometry.output_size(height, width)
    if geometry.pointwise:
        return x.reshape(batch * height * width, 1, channels)
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = geometry.padding, geometry.stride, geometry.dilation, geometry.kernel
    padded = F.pad(x, (0, 0, pw, pw, ph, ph), value=pad_value) if ph or pw else x.contiguous()
    n_stride, h_stride, w_stride, c_stride = padded.stride()
    windows = padded.as_strided((batch, out_h, out_w, kh, kw, channels),
                                (n_stride, h_stride * sh, w_stride * sw, h_stride * dh, w_stride * dw, c_stride))
    return windows.reshape(batch * out_h * out_w, kh * kw, channels)


def window_scales(x: torch.Tensor, geometry: ConvGeometry, bits: int) -> torch.Tensor:
    """Dynamic scales of x [N, H, W, C] (any float dtype): one per output pixel [N·Ho·Wo] fp32,
    the absmax of its whole window, without gathering the windows: each pixel's absmax, then
    their maximum over the window (max is exact, so these equal the gathered rows' scales; NaN
    propagates through both). Zero padding leaves every window's max as it is (|x| >= 0)."""
    absmax = x.float().abs().amax(dim=3).unsqueeze(1)  # [N, 1, H, W]
    (ph, pw) = geometry.padding
    window_max = F.max_pool2d(F.pad(absmax, (pw, pw, ph, ph)), geometry.kernel, geometry.stride, 0, geometry.dilation)
    return absmax_scale(window_max.reshape(-1), bits)


def conv_weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """An nn.Conv2d weight [O, C/g, kh, kw] as the GEMM's [O, kh·kw·C/g] (tap-major)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def conv_weight_tensor(matrix: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Inverse of conv_weight_matrix: [O, kh·kw·C/g] → [O, C/g, kh, kw]."""
    kh, kw = geometry.kernel
    return matrix.reshape(matrix.shape[0], kh, kw, -1).permute(0, 3, 1, 2)


def _group_rows(weight: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    rows = {field.name: getattr(weight, field.name)[start:stop] for field in dataclasses.fields(weight)
            if field.name in ("data", "scale", "group_scale", "zero", "colsum")
            and getattr(weight, field.name) is not None}
    return dataclasses.replace(weight, panels=None, **{name: t.contiguous() for name, t in rows.items()})


# The GPU kernels specialize K and the rows' strides on divisibility by 16; an unaligned K (a 7×7
# stem over 3 channels: 147) compiles to unvectorized loads that spill. Their GEMMs run at K
# rounded up to it: zero weight columns, zero codes (no term, whatever the zero point).
GPU_K_MULTIPLE = 16


def _padded_weight(weight: QuantizedWeight, depth: int) -> QuantizedWeight:
    """`weight` with zero columns up to `depth` (its format, colsum and scales unchanged)."""
    extra = depth - weight.in_features
    # A zero byte of packed int4 is two zero nibbles (convolutions store "int8" or "int4", K even).
    data = F.pad(weight.data, (0, extra if weight.format == "int8" else extra // 2))
    return dataclasses.replace(weight, data=data, panels=None)


def _gemm_depth(depth: int, backend: str) -> int:
    return -(-depth // GPU_K_MULTIPLE) * GPU_K_MULTIPLE if backend in ("triton", "cuda") else depth


def _rows_of(tensor: Optional[torch.Tensor], start: int, stop: int) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[start:stop].contiguous()


def _columns_of(tensor: Optional[torch.Tensor], start: int, stop: int) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[:, start:stop].contiguous()


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """The input-independent operands of one quantized convolution (the conv twin of LinearPlan).

    `weight`: integer format, [O, taps·C/g] (conv_weight_matrix order), per-channel scales with
    any BatchNorm folded in. `act_bits`: 2..8 (integer activations only). Static activations:
    `input_scale` [1] (and `input_zero_point` [1] int8). `bias` [O], `lowrank_u` [O, r],
    `fullrank_w` [O, K_c], `activation` and `residual_before_activation` are the epilogue's. `group_weights` holds each
    group's rows (with the CPU panels once frozen); empty until `frozen`."""

    weight: QuantizedWeight
    geometry: ConvGeometry
    act_bits: int
    input_scale: Optional[torch.Tensor] = None
    input_zero_point: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    lowrank_u: Optional[torch.Tensor] = None
    fullrank_w: Optional[torch.Tensor] = None
    activation: str = "none"
    residual_before_activation: bool = False  # act(y + residual): a residual block's last convolution
    group_weights: Tuple[QuantizedWeight, ...] = ()
    pad_code: Optional[int] = None  # the code of 0 in gathered windows, read off the zero point once frozen

    @property
    def out_channels(self) -> int:
        return self.weight.data.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.in_features // self.geometry.taps * self.geometry.groups

    @property
    def depthwise(self) -> bool:
        return self.geometry.groups > 1 and self.in_channels == self.geometry.groups

    @property
    def dtype(self) -> Optional[torch.dtype]:
        bound = self.lowrank_u if self.lowrank_u is not None else self.fullrank_w
        return None if bound is None else bound.dtype

    def check(self) -> None:
        """ValueError naming the first operand that does not fit."""
        if not isinstance(self.weight, QuantizedWeight) or self.weight.format not in INTEGER_FORMATS:
            raise ValueError(f"a convolution's weight must be an integer-format QuantizedWeight {INTEGER_FORMATS}, "
                             f"got {getattr(self.weight, 'format', type(self.weight).__name__)}")
        self.weight.check()
        check_bits("act_bits", self.act_bits)
        groups, taps = self.geometry.groups, self.geometry.taps
        if self.weight.in_features % taps:
            raise ValueError(f"the weight's {self.weight.in_features} columns are not kh·kw = {taps} taps of channels")
        if self.out_channels % groups:
            raise ValueError(f"out_channels={self.out_channels} is not a multiple of groups={groups}")
        device = self.weight.data.device
        probe = torch.zeros((1, self.in_channels), dtype=self.dtype or torch.float32, device=device)
        check_quantize_activation(probe, self.act_bits, self.input_scale, self.input_zero_point, "none", None, None,
                                  1.0, None)
        if self.input_zero_point is not None and self.weight.colsum is None:
            raise ValueError("weight.colsum is required with input_zero_point (the −z·colsum(W_q) term)")
        check_choice("activation", self.activation, reference.ACTIVATIONS)
        if self.activation in reference.GATED_ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is gated; a convolution's epilogue takes "
                             f"{[a for a in reference.ACTIVATIONS if a not in reference.GATED_ACTIVATIONS]}")
        a = torch.zeros((1, self.weight.in_features), dtype=torch.int8, device=device)
        scale = torch.ones(1, dtype=torch.float32, device=device)
        width = lambda right: None if right is None else probe.new_zeros((1, right.shape[1]))  # noqa: E731
        check_fused_linear(fused_linear_operands(
            a, scale, self.weight, a_zero_point=gemm_zero_point(self.input_zero_point, self.act_bits),
            lowrank_t=width(self.lowrank_u), lowrank_u=self.lowrank_u, fullrank_x=width(self.fullrank_w),
            fullrank_w=self.fullrank_w, bias=self.bias, activation=self.activation, out_dtype=torch.float32))

    def frozen(self) -> "ConvPlan":
        """Checked, with each group's weight rows split out in the layout its kernels read: what a
        converted model holds, built once."""
        self.check()
        parts = self._group_parts()
        if not self.depthwise:
            on_gpu = self.weight.data.device.type != "cpu"  # cuda, or meta (planning the GPU's launches)
            parts = tuple(_padded_weight(part, _gemm_depth(part.in_features, "triton")) if on_gpu else with_panels(part)
                          for part in parts)
        return dataclasses.replace(self, group_weights=parts, pad_code=self._pad_code())

    def _pad_code(self) -> int:
        """z at 8 bits with a zero point (the GEMM subtracts z·colsum), else 0. On the meta device
        (shapes only) there is no value to read: 0."""
        zero = self.input_zero_point
        if zero is None or self.act_bits != 8 or zero.device.type == "meta":
            return 0
        return int(zero.item())  # once per plan: a frozen plan never syncs with the device per call

    def _group_parts(self) -> Tuple[QuantizedWeight, ...]:
        groups = self.geometry.groups
        if groups == 1 or self.depthwise:
            return (self.weight,)
        step = self.out_channels // groups
        return tuple(_group_rows(self.weight, g * step, (g + 1) * step) for g in range(groups))

    def padding_code(self) -> int:
        """The code gathered windows hold outside the image: the frozen plan's, else read now."""
        return self.pad_code if self.pad_code is not None else self._pad_code()

    def gemm_weights(self) -> Tuple[QuantizedWeight, ...]:
        """Each group's weight rows: the frozen plan's, else split now."""
        return self.group_weights or self._group_parts()

    # -- the per-call part ------------------------------------------------------------------

    def pixel_codes(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """Static scales: the int8 codes [N, H, W, C] of every pixel of x (contiguous), quantized
        once on `backend`'s quantizer."""
        args = (x.reshape(-1, x.shape[3]), self.act_bits, self.input_scale, self.input_zero_point, "none", None, None,
                1.0, None, False)
        codes, _, _ = implementation_for("quantize_activation", backend, *args).eager(x)(*args)
        return codes.reshape(x.shape)

    def quantize_input(self, x: torch.Tensor, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [M, taps, C], scale fp32 [M] or [1]) of x [N, H, W, C] (contiguous): the
        windows gathered in memory."""
        geometry = self.geometry
        if self.input_scale is None:  # one scale per window
            windows = gather_windows(x, geometry).reshape(-1, geometry.taps * x.shape[3])
            args = (windows, self.act_bits, None, None, "none", None, None, 1.0, None, False)
            codes, scale, _ = implementation_for("quantize_activation", backend, *args).eager(x)(*args)
            return codes.reshape(-1, geometry.taps, x.shape[3]), scale
        return gather_windows(self.pixel_codes(x, backend), geometry, self.padding_code()), self.input_scale

    def group_operands(self, group: int, a: torch.Tensor, scale: torch.Tensor, weight: QuantizedWeight,
                       lowrank_t: Optional[torch.Tensor], fullrank_x: Optional[torch.Tensor],
                       residual_rows: Optional[torch.Tensor], out_dtype: torch.dtype, requant_bits: int):
        """Group `group`'s fused-linear operands: its activations `a` (in the layout its kernel
        reads) and weight rows, and its output channels' slice of every per-channel operand.
        Several groups' outputs are fp32, concatenated by `joined_groups`."""
        groups = 1 if self.depthwise else self.geometry.groups  # a depthwise kernel takes every channel at once
        if groups == 1:
            sliced = lambda tensor, columns=False: tensor  # noqa: E731
        else:
            lo, hi = group * self.out_channels // groups, (group + 1) * self.out_channels // groups
            sliced = lambda tensor, columns=False: (_columns_of if columns else _rows_of)(tensor, lo, hi)  # noqa: E731
        return fused_linear_operands(
            a, scale, weight, a_zero_point=gemm_zero_point(self.input_zero_point, self.act_bits), lowrank_t=lowrank_t,
            lowrank_u=sliced(self.lowrank_u), fullrank_x=fullrank_x, fullrank_w=sliced(self.fullrank_w),
            bias=sliced(self.bias), activation=self.activation, residual=sliced(residual_rows, True),
            out_dtype=torch.float32 if groups > 1 else out_dtype, requant_bits=requant_bits if groups == 1 else 0,
            residual_before_activation=self.residual_before_activation and residual_rows is not None)

    def joined_groups(self, parts, shape: Tuple[int, int, int], out_dtype: torch.dtype, requant_bits: int):
        """The groups' fp32 outputs [M, O/g] as the convolution's output of `shape` (N, Ho, Wo)."""
        y = torch.cat(parts, dim=1)
        if requant_bits:
            q, q_scale = reference.quantize_output(y, requant_bits)
            return q.reshape(*shape, -1), q_scale
        return y.to(out_dtype).reshape(*shape, self.out_channels)

    def run(self, x: torch.Tensor, lowrank_t: Optional[torch.Tensor] = None,
            fullrank_x: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
            out_dtype: Optional[torch.dtype] = None, requant_bits: int = 0):
        """The convolution of x [N, H, W, C] (contiguous, checked by the caller): [N, Ho, Wo, O] in
        `out_dtype` (default x.dtype), or with `requant_bits` the per-pixel re-quantized (q
        [N, Ho, Wo, O] int8, scale [N·Ho·Wo]). T [M, r] / X_c [M, K_c] in the plan's dtype and the
        residual [N, Ho, Wo, O], M = N·Ho·Wo. It runs on the selected backend's `conv_gemm`: a
        kernel that gathers the windows in its K loop where the backend has one for this plan,
        else `gathered_conv_gemm` (windows gathered in memory, then the backend's fused linear)."""
        backend = resolve_backend(x.device)
        if backend == "simulate":
            raise ValueError("ConvPlan.run is the integer path; under 'simulate' use ops.quantized_conv2d")
        return implementation_for("conv_gemm", backend, x, self).run(
            x, self, lowrank_t, fullrank_x, residual, out_dtype or x.dtype, requant_bits)

    def depthwise_sum(self, codes, scale, zero, weight: QuantizedWeight, lowrank_t, fullrank_x, residual):
        """One input channel per group: acc[m, o] = Σ_tap codes[m, tap, o // multiplier]·W[o, tap]
        in int32 (exact), then the reference's dequantization and epilogue in fp32."""
        integer = weight.integer()  # [O, taps]
        multiplier = self.out_channels // codes.shape[2]
        taps = codes.to(torch.int32).repeat_interleave(multiplier, dim=2) if multiplier > 1 else codes.to(torch.int32)
        acc = (taps * integer.t()[None]).sum(dim=1, dtype=torch.int32)
        if zero is not None:
            acc = acc - zero.to(torch.int32) * integer.sum(dim=1, dtype=torch.int32)[None]
        y = acc.float() * scale.float().reshape(-1, 1) * weight.scale[None, :]
        return reference.epilogue(y, lowrank_t, self.lowrank_u, fullrank_x, self.fullrank_w, self.bias,
                                  self.activation, residual, self.residual_before_activation)


def gathered_conv_gemm(x: torch.Tensor, plan: ConvPlan, lowrank_t: Optional[torch.Tensor],
                       fullrank_x: Optional[torch.Tensor], residual: Optional[torch.Tensor], out_dtype: torch.dtype,
                       requant_bits: int):
    """`ConvPlan.run` with the windows gathered in memory (`quantize_input`), then the selected
    backend's fused linear per group (or the depthwise tap sum): every backend's `conv_gemm`
    for the plans its kernels do not gather themselves."""
    backend = resolve_backend(x.device)
    batch, height, width, _ = x.shape
    out_h, out_w = plan.geometry.output_size(height, width)
    codes, scale = plan.quantize_input(x, backend)
    rows = codes.shape[0]
    residual_rows = None if residual is None else residual.reshape(rows, plan.out_channels)
    weights = plan.gemm_weights()
    if plan.depthwise:
        zero = gemm_zero_point(plan.input_zero_point, plan.act_bits)
        y = plan.depthwise_sum(codes, scale, zero, weights[0], lowrank_t, fullrank_x, residual_rows)
        return plan.joined_groups([y], (batch, out_h, out_w), out_dtype, requant_bits)
    groups = plan.geometry.groups
    step_in = codes.shape[2] // groups
    parts = []
    for g, weight in enumerate(weights):
        a = codes.reshape(rows, -1) if groups == 1 else codes[:, :, g * step_in:(g + 1) * step_in].reshape(rows, -1)
        depth = max(weight.in_features, _gemm_depth(a.shape[1], backend))
        if depth != a.shape[1]:
            a = F.pad(a, (0, depth - a.shape[1]))
        if depth != weight.in_features:  # an unfrozen or CPU-frozen weight on a GPU backend
            weight = _padded_weight(weight, depth)
        operands = plan.group_operands(g, a, scale, weight, lowrank_t, fullrank_x, residual_rows, out_dtype,
                                       requant_bits)
        out, out_scale = implementation_for("fused_linear", backend, operands).eager(x)(operands)
        if groups == 1:
            shape = (batch, out_h, out_w, plan.out_channels)
            return (out.reshape(shape), out_scale) if requant_bits else out.reshape(shape)
        parts.append(out)
    return plan.joined_groups(parts, (batch, out_h, out_w), out_dtype, requant_bits)


register("conv_gemm", "reference", gathered_conv_gemm)


def check_conv_input(name: str, x, plan: ConvPlan) -> None:
    """x [N, H, W, C] in a float dtype on the plan's device, with the plan's channels and at
    least one output pixel."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [batch, height, width, channels] (channels last), got "
                         f"{getattr(x, 'shape', type(x))}")
    check_tensor(name, x, device=plan.weight.data.device, dtypes=FLOAT_DTYPES, contiguous=False)
    if x.shape[3] != plan.in_channels:
        raise ValueError(f"{name} has {x.shape[3]} channels, the convolution expects {plan.in_channels}")
    out_h, out_w = plan.geometry.output_size(x.shape[1], x.shape[2])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{name}'s {x.shape[1]}×{x.shape[2]} grid is smaller than the window "
                         f"{plan.geometry.kernel} (dilation {plan.geometry.dilation}, padding {plan.geometry.padding})")


def simulated_conv2d(x: torch.Tensor, plan: ConvPlan, lowrank_t=None, fullrank_x=None, residual=None) -> torch.Tensor:
    """The fake-quantized twin of ConvPlan.run (differentiable): x [N, H, W, C] → [N, Ho, Wo, O]
    in x.dtype. The windows' values are fake-quantized as the integer path quantizes them, then
    multiplied by the dequantized weight in fp32."""
    geometry, bits = plan.geometry, plan.act_bits
    batch, height, width, channels = x.shape
    out_h, out_w = geometry.output_size(height, width)
    weight = conv_weight_tensor(plan.weight.dequantize(), geometry)  # [O, C/g, kh, kw] fp32
    nchw = x.float().permute(0, 3, 1, 2)
    if plan.input_scale is not None:
        fake = simulate.fake_quantize(nchw, plan.input_scale.float().reshape(()), bits, plan.input_zero_point)
        y = F.conv2d(fake, weight, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
    else:
        scale = window_scales(x.detach(), geometry, bits).reshape(batch, 1, out_h * out_w)  # [N, 1, L]
        windows = F.unfold(nchw, geometry.kernel, geometry.dilation, geometry.padding, geometry.stride)  # [N, C·taps, L]
        lo, hi = qrange(bits)
        fake = simulate.round_ste(windows / scale).clamp(lo, hi) * scale
        groups = geometry.groups
        fake = fake.reshape(batch, groups, -1, out_h * out_w)
        matrix = weight.reshape(groups, plan.out_channels // groups, -1)  # (c, kh, kw) order, as unfold
        y = torch.einsum("gok,ngkl->ngol", matrix, fake).reshape(batch, plan.out_channels, out_h, out_w)
    y = y.permute(0, 2, 3, 1).reshape(-1, plan.out_channels)
    residual = None if residual is None else residual.reshape(-1, plan.out_channels)
    y = reference.epilogue(y, lowrank_t, plan.lowrank_u, fullrank_x, plan.fullrank_w, plan.bias, plan.activation,
                           residual, plan.residual_before_activation)
    return y.to(x.dtype).reshape(batch, out_h, out_w, plan.out_channels)
