"""QuantConv2d: the drop-in replacement for nn.Conv2d, on the integer convolution (ops/conv.py).

Weights are quantized per output channel to the config's weight bits (symmetric; a group-wise
config's convolutions use per-channel scales, as their K is taps × channels, rarely a multiple
of the group). 4-bit weights are stored packed two per byte where kh·kw·C/g is even, else as
int8 values in −8..7. Activations are quantized per output pixel window (dynamic) or per
tensor after calibration (`set_static_activation`); W4A16 (floating-point activations) has no
integer convolution and is refused.

The layer takes NCHW tensors as every CNN passes them and computes channels last: an input in
`torch.channels_last` memory format is read without a copy, and the output is an NCHW view of
channels-last memory, so a chain of quantized convolutions never transposes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..formats.int4 import pack_int4
from ..formats.weights import QuantizedWeight
from ..ops.checks import FLOAT_DTYPES
from ..ops.conv import ConvGeometry, ConvPlan, check_conv_input, conv_weight_matrix, simulated_conv2d
from ..quant.config import W8A8, QuantConfig
from ..quant.primitives import qrange, quantize_symmetric
from .quant_linear import apply_keeping_fp32, checked_static_activation, register_activation_buffers


def conv_weight_format(config: QuantConfig, in_features: int) -> str:
    """The storage format of a convolution's [O, kh·kw·C/g] weight under `config`."""
    return "int4" if config.weight_bits == 4 and in_features % 2 == 0 else "int8"


class QuantConv2d(nn.Module):
    """A Conv2d whose weight is stored quantized and whose forward runs the integer convolution
    (or its fake-quantized twin under `simulate`). Buffers: `weight` (codes [O, kh·kw·C/g] in
    the GEMM's tap-major order, int8 or packed int4), `weight_scale` fp32 [O], and after a static
    calibration `input_scale`, `input_zero_point`, `weight_colsum`; `bias` fp."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, config: Optional[QuantConfig] = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig (W8A8, W4A8, W4A4), got {config!r}")
        if config.act_bits is None:
            raise ValueError(f"{type(config).__name__} keeps activations in floating point; there is no integer "
                             "convolution for it: quantize convolutions with W8A8, W4A8 or W4A4")
        if config.rotate is not None:
            raise ValueError("online rotation (rotate=...) is not supported for convolutions")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.geometry = ConvGeometry(kernel_size, stride, padding, dilation, groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be multiples of "
                             f"groups={groups}")
        self.in_channels, self.out_channels, self.config = in_channels, out_channels, config
        self.in_features = self.geometry.taps * in_channels // groups
        self.weight_format = conv_weight_format(config, self.in_features)
        packed = self.in_features if self.weight_format == "int8" else self.in_features // 2
        empty = lambda shape, dt: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        self.register_buffer("weight", empty((out_channels, packed),
                                             torch.int8 if self.weight_format == "int8" else torch.uint8))
        self.register_buffer("weight_scale", empty((out_channels,), torch.float32))
        register_activation_buffers(self, out_channels, bias, device, dtype)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QuantConfig) -> "QuantConv2d":
        """Quantizes an nn.Conv2d (round to nearest, per output channel). A conv on the meta
        device gives the layer's shapes on the meta device (a skeleton to load into)."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if not plain_convolution(conv):
            raise ValueError(f"{type(conv).__name__} has its own forward (a padding or weight transform of its own): "
                             "its weight alone does not say what it computes")
        geometry = ConvGeometry.of(conv)
        layer = cls(conv.in_channels, conv.out_channels, geometry.kernel, geometry.stride, geometry.padding,
                    geometry.dilation, geometry.groups, conv.bias is not None, config, device=conv.weight.device,
                    dtype=None if conv.bias is None else conv.bias.dtype)
        if conv.weight.is_meta:
            return layer
        layer.load_codes(*quantize_symmetric(conv_weight_matrix(conv.weight.detach()), config.weight_bits, "row"))
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    @torch.no_grad()
    def load_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Stores integer weight codes [O, kh·kw·C/g] (`conv_weight_matrix` order, int8, within the
        config's weight range) and their per-channel steps [O] in this layer's format."""
        lo, hi = qrange(self.config.weight_bits)
        if codes.dtype != torch.int8 or codes.shape != (self.out_channels, self.in_features):
            raise ValueError(f"codes must be int8 of shape {(self.out_channels, self.in_features)}, got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ValueError(f"codes must lie in [{lo}, {hi}] for {self.config.weight_bits}-bit weights")
        if scale.shape != (self.out_channels,):
            raise ValueError(f"scale must have shape ({self.out_channels},), got {tuple(scale.shape)}")
        self.weight.copy_(codes if self.weight_format == "int8" else pack_int4(codes, signed=True))
        self.weight_scale.copy_(scale)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight, self.weight_format, self.weight_scale, colsum=self.weight_colsum)

    def set_static_activation(self, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None) -> None:
        """Fixes a calibrated per-tensor activation scale (and signed-domain integer zero point)."""
        if self.runtime_plan is not None:
            raise ValueError("this layer is converted for runtime (convert_for_runtime): set static activations on "
                             "the calibration model, then convert again")
        scale, zero = checked_static_activation(scale, zero_point, self.config.act_bits, self.weight.device)
        self.input_scale, self.input_zero_point = scale, zero
        self.weight_colsum = None if zero is None else self.quantized_weight().integer().sum(dim=1, dtype=torch.int32)

    def activation_input(self, x: torch.Tensor) -> torch.Tensor:
        """The values a static activation scale covers: x's pixels as rows [N·H·W, C] (what
        methods.ptq observes)."""
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def pixel_weight(self) -> torch.Tensor:
        """The dequantized weight as a linear map of one input pixel to every tap's
        contribution, [O·kh·kw, C] (zero outside a pixel's group): how methods.ptq weighs the
        output error of a candidate activation scale."""
        groups, taps = self.geometry.groups, self.geometry.taps
        matrix = self.quantized_weight().dequantize().reshape(self.out_channels, taps, -1)  # [O, taps, C/g]
        step_in, step_out = self.in_channels // groups, self.out_channels // groups
        dense = matrix.new_zeros((self.out_channels, taps, self.in_channels))
        for g in range(groups):
            dense[g * step_out:(g + 1) * step_out, :, g * step_in:(g + 1) * step_in] = matrix[g * step_out:(g + 1) * step_out]
        return dense.reshape(-1, self.in_channels)

    runtime_plan: Optional[ConvPlan] = None  # set by `freeze` (convert_for_runtime)
    # A residual block's QwT compensation run in this layer's epilogue (models/conv_blocks.py):
    # (W_c [O, C_in] dense, b_c [O], stride); the forward then takes the block input.
    lowered_qwt: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None

    @property
    def lowered_adapter(self) -> Optional[nn.Module]:
        """A residual block's QLA adapter (nn/conv_adapters.py) run in this layer's low-rank
        segment: a submodule (it moves and casts with the layer), set at conversion."""
        return self._modules.get("lowered_adapter")
    # A per-channel affine map (BatchNorm) after the layer, folded at conversion: (scale, shift).
    folded_affine = None

    def build_plan(self, check: bool = True) -> ConvPlan:
        """This layer's operands as a ConvPlan, with a folded BatchNorm's per-channel scale a and
        shift b: y·a + b = conv with weight scale s·a and bias bias·a + b."""
        weight, bias = self.quantized_weight(), None if self.bias is None else self.bias.detach().float()
        if self.folded_affine is not None:
            scale, shift = self.folded_affine
            weight = dataclasses.replace(weight, scale=weight.scale * scale)
            bias = shift if bias is None else bias * scale + shift
        after_residual = self.activation_after_residual != "none"
        fullrank_w = None
        if self.lowered_qwt is not None:  # b_c rides as the weight of a column of ones in X_c
            compensation, compensation_bias, _ = self.lowered_qwt
            fullrank_w = torch.cat([compensation, compensation_bias[:, None].to(compensation.dtype)], dim=1).contiguous()
        lowrank_u = None if self.lowered_adapter is None else self.lowered_adapter.up_matrix().contiguous()
        plan = ConvPlan(weight, self.geometry, self.config.act_bits, self.input_scale, self.input_zero_point, bias,
                        lowrank_u=lowrank_u, fullrank_w=fullrank_w,
                        activation=self.activation_after_residual if after_residual else self.fused_activation,
                        residual_before_activation=after_residual)
        return plan.frozen() if check else plan

    fused_activation = "none"  # an activation after the layer (and its folded BatchNorm), run in its epilogue
    # The activation after a residual add that a fused residual block hands this layer: its forward
    # then takes the shortcut and computes act(y + residual) (models/conv_blocks.py).
    activation_after_residual = "none"
    treated_by = ()  # the TreatedBy wrappers of the modules folded into the epilogue (models/conv_epilogues.py)

    def freeze(self) -> None:
        """Converts the layer to its runtime form: its forward runs `build_plan()`, built now."""
        self.runtime_plan = self.build_plan()

    def thaw(self) -> None:
        self.__dict__.pop("runtime_plan", None)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                block_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, C, H, W] (any memory format; channels last is read in place) → [N, O, Ho, Wo] as
        a view of channels-last memory, in x.dtype. `residual` [N, O, Ho, Wo] is added after the
        epilogue's activation, or joins before it in a fused residual block's last convolution;
        `block_input` [N, C_in, H, W] is that block's input, which a lowered QwT compensation
        reads (at its stride, never quantized)."""
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() != 4:
            raise ValueError(f"x must be a 4-D float16/bfloat16/float32 tensor [N, C, H, W], got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        plan = self.runtime_plan or self.build_plan(check=False)
        if plan.residual_before_activation and residual is None:
            raise ValueError("this convolution ends a fused residual block: call it with the shortcut (residual=)")
        nhwc = x.permute(0, 2, 3, 1)
        check_conv_input("x", nhwc, plan)
        nhwc = nhwc.contiguous()
        residual_nhwc = None if residual is None else residual.permute(0, 2, 3, 1).contiguous()
        fullrank_x = None if self.lowered_qwt is None else self._compensation_input(block_input, nhwc, plan)
        lowrank_t = None if self.lowered_adapter is None else self._adapter_input(block_input, nhwc, plan)
        if ops.resolve_backend(x.device) == "simulate":
            if self.runtime_plan is not None:
                raise ValueError("a converted (runtime) model does not run under the 'simulate' backend: calibrate "
                                 "and train the model before convert_for_runtime")
            y = simulated_conv2d(nhwc, plan, lowrank_t=lowrank_t, fullrank_x=fullrank_x, residual=residual_nhwc)
        else:
            if torch.is_grad_enabled() and x.requires_grad:
                raise ValueError("the integer convolution has no gradient: train and calibrate under "
                                 "qk.use_backend('simulate')")
            y = plan.run(nhwc, lowrank_t=lowrank_t, fullrank_x=fullrank_x, residual=residual_nhwc)
        y = y.permute(0, 3, 1, 2)
        if self.treated_by:
            y._qla_treated_by = self.treated_by
        return y

    def _compensation_input(self, block_input: Optional[torch.Tensor], x: torch.Tensor, plan: ConvPlan) -> torch.Tensor:
        """X_c = [block input at the compensation's stride, 1] as rows [N·Ho·Wo, C_in + 1], in the
        compensation's dtype (the model's, after a cast: fp16 corrections on fp16 models)."""
        if block_input is None:
            raise ValueError("this convolution runs its block's QwT compensation: call it with block_input=")
        stride = self.lowered_qwt[2]
        pixels = block_input[:, :, ::stride, ::stride].permute(0, 2, 3, 1)
        out_h, out_w = plan.geometry.output_size(x.shape[1], x.shape[2])
        if pixels.shape[1:3] != (out_h, out_w):
            raise ValueError(f"block_input at stride {stride} is {tuple(pixels.shape[1:3])}, the output {out_h}×{out_w}")
        rows = pixels.reshape(-1, pixels.shape[3]).to(plan.fullrank_w.dtype)
        return torch.cat([rows, rows.new_ones((rows.shape[0], 1))], dim=1)

    def _adapter_input(self, block_input: Optional[torch.Tensor], x: torch.Tensor, plan: ConvPlan) -> torch.Tensor:
        """T = GELU(down(DW(block input))) as rows [N·Ho·Wo, r] in the adapter's dtype."""
        if block_input is None:
            raise ValueError("this convolution runs its block's QLA adapter: call it with block_input=")
        t = self.lowered_adapter.down_path(block_input)
        out_h, out_w = plan.geometry.output_size(x.shape[1], x.shape[2])
        if t.shape[2:] != (out_h, out_w):
            raise ValueError(f"the adapter's down path gives a {tuple(t.shape[2:])} grid, the output is {out_h}×{out_w}")
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).contiguous()

    def _apply(self, fn, recurse=True):
        apply_keeping_fp32(self, fn, recurse)
        device = self.weight.device
        if self.folded_affine is not None:
            self.folded_affine = tuple(t.to(device) for t in self.folded_affine)
        if self.lowered_qwt is not None:  # cast and moved as the model is (fp16 corrections on a fp16 model)
            self.lowered_qwt = (fn(self.lowered_qwt[0]), fn(self.lowered_qwt[1]), self.lowered_qwt[2])
        if self.runtime_plan is not None:
            self.freeze()
        return self

    def extra_repr(self) -> str:
        g = self.geometry
        activation = "static" if self.input_scale is not None else "dynamic per window"
        folded = ", BatchNorm folded" if self.folded_affine is not None else ""
        fused = f", fused {self.fused_activation}" if self.fused_activation != "none" else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel}, stride={g.stride}, "
                f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, bias={self.bias is not None}, "
                f"config={self.config}, activations={activation}{folded}{fused}")


def plain_convolution(conv: nn.Conv2d) -> bool:
    """An nn.Conv2d that computes what its weight, bias and geometry say (timm's Conv2dSame pads
    per call and StdConv2d standardizes its weight in forward: neither does)."""
    return type(conv).forward is nn.Conv2d.forward and type(conv)._conv_forward is nn.Conv2d._conv_forward


class TreatedBy(nn.Module):
    """A module whose work a convolution's epilogue did for some tensors (a folded BatchNorm, a
    fused activation): a tensor the convolution marked passes through unchanged (the tensor
    carries the mark, not the module: concurrent calls stay correct); any other input runs the
    module (torchvision's ResNet applies one ReLU module after a convolution and after its
    residual add)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x, *args, **kwargs):
        if self in getattr(x, "_qla_treated_by", ()):
            return x
        return self.module(x, *args, **kwargs)


def quantize_convs_(model: nn.Module, config: QuantConfig,
                    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                    stem_config: Optional[QuantConfig] = W8A8()) -> nn.Module:
    """Replaces, in place, every nn.Conv2d selected by `filter_fn(module, fqn)` (default: all) by
    a QuantConv2d for `config`. The stem, the first convolution of the model (in module order: the
    one that reads the image in the architectures this project knows), takes `stem_config`: W8A8
    by default, as the papers keep it (None: `config` too). A convolution with a forward of its
    own (timm's Conv2dSame, StdConv2d) stays in floating point, with a warning naming it. Returns
    `model`. Atomic: every
    selected convolution is converted before any is swapped, so a ValueError (naming the module)
    leaves the model as it was; selecting nothing is a ValueError."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if stem_config is not None and not isinstance(stem_config, QuantConfig):
        raise ValueError(f"stem_config must be a QuantConfig or None, got {stem_config!r}")
    convolutions = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem = convolutions[0][0] if convolutions else None
    targets = [(name, m) for name, m in convolutions if filter_fn is None or filter_fn(m, name)]
    own = [name for name, m in targets if not plain_convolution(m)]
    if own:
        warnings.warn(f"{len(own)} convolutions have their own forward and stay in floating point: {own[:5]}",
                      stacklevel=2)
        targets = [(name, m) for name, m in targets if name not in own]
    if not targets:
        raise ValueError("no nn.Conv2d selected for quantization")
    replacements = []
    for name, module in targets:
        try:
            chosen = stem_config if (name == stem and stem_config is not None) else config
            replacements.append((name, QuantConv2d.from_float(module, chosen)))
        except ValueError as error:
            raise ValueError(f"cannot quantize {name!r}: {error}") from error
    for name, replacement in replacements:
        model.set_submodule(name, replacement)
    return model
