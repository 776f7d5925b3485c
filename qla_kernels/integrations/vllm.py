"""vLLM serving: `vllm.LLM(model=dir, quantization="qla")` on a directory `save_pretrained` wrote.

The entry point `vllm.general_plugins: qla` (setup.py) runs `register` in every vLLM process. It
registers the quantization method "qla": `QlaVllmConfig` is built from the checkpoint's
`quantization_config` (the layout of integrations/transformers.py), and every vLLM linear layer
whose checkpoint linears the layout quantized gets a `QlaLinearMethod`:

- `create_weights` registers the codes, scales, zero points and static activation scales under
  the checkpoint's own names, as vLLM's parameter classes (`ModelWeightParameter`,
  `PackedvLLMParameter` for the int4 codes packed two per byte along K, `ChannelQuantScaleParameter`,
  `GroupQuantScaleParameter`, `PerTensorScaleParameter`), so vLLM's loaders shard them for
  tensor parallelism and stack q/k/v and gate/up into its merged layers;
- `process_weights_after_loading` builds the layer's frozen `LinearPlan` (ops/linear_plan.py) from
  what this rank loaded; `apply` runs it on this project's kernels: the cpu backend (or the
  reference where it is not built) on CPU, Triton/CUDA on GPU.

QwT. A block's compensation c(x) = x·W_cᵀ + b is added to the block output, which in vLLM's
pre-norm decoders is the block's last linear's output plus the residual stream (`_place_qwt`
checks the block has that form): the checkpoint's
`<block>.qwt.*` tensors load into that linear (`qwt_weight`, `qwt_bias`, `qwt_down`), and its GEMM
adds x·W_cᵀ in the full-rank segment (or (x·V)·Uᵀ in the low-rank one), x the block input handed
over by a hook on the decoder layer (nn/forward_context.py), b in the bias. In a row-parallel
layer each rank multiplies its slice of x's channels (W_c and V sharded along their input), the
all-reduce sums the parts, and only rank 0 adds b.

Not served (ValueError at load): QLA adapters, convolutions, post-norm QwT (`output_norm`), QwT
in blocks of another form (a norm after the MLP, experts), a rotating config in a row-parallel
layer split over ranks (the Hadamard rotation spans the whole K). With tensor parallelism, a
row-parallel layer's dynamic per-token activation scale is the whole row's (the ranks' absolute
maxima over their K slices gathered through vLLM's tensor-parallel group, the largest taken: one
more all-gather of M floats per rank per such layer), so every rank quantizes to the codes one
unsplit layer would; vLLM's own int8 methods take each rank's own scale instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from vllm.distributed import get_tp_group
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, RowParallelLinear,
                                               UnquantizedLinearMethod, register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter, GroupQuantScaleParameter,
                                           ModelWeightParameter, PackedvLLMParameter, PerTensorScaleParameter,
                                           RowvLLMParameter)

from ..formats.weights import QuantizedWeight
from ..nn import forward_context
from ..nn.serialization import check_layout_version
from ..ops.linear_plan import LinearPlan
from ..quant.config import QuantConfig
from ..quant.primitives import absmax_scale, quantize_with_scale
from .transformers import QUANT_METHOD

def register() -> None:
    """Registers "qla" with vLLM (the `vllm.general_plugins` entry point; idempotent: vLLM calls it
    in every process, and a second call changes nothing)."""
    if QUANT_METHOD not in QUANTIZATION_METHODS or not _registered_here():
        register_quantization_config(QUANT_METHOD)(QlaVllmConfig)


def _registered_here() -> bool:
    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        return get_quantization_config(QUANT_METHOD) is QlaVllmConfig
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class _QwTEntry:
    """A block's QwT compensation as the layer that adds it sees it."""

    block: str  # the decoder block's name, whose input x is the compensation's input
    d_out: int
    d_in: int
    rank: Optional[int]  # None: full rank (W_c [d_out, d_in]); else V [d_in, r], U [d_out, r]


class QlaVllmConfig(QuantizationConfig):
    """The "qla" quantization config of a vLLM model: the checkpoint's layout (module doc)."""

    def __init__(self, layout: Dict[str, Any]):
        super().__init__()
        if not isinstance(layout, dict):
            raise ValueError(f"the qla quantization_config's layout must be a dict, got {type(layout).__name__}")
        check_layout_version(layout, "quantization_config")
        for key, what in (("qla_kernels.qla", "QLA adapters"), ("qla_kernels.quant_convs", "quantized convolutions"),
                          ("qla_kernels.qla_conv", "QLA convolution adapters"),
                          ("qla_kernels.quant_attention", "quantized attention cores")):
            if layout.get(key):
                raise ValueError(f"this checkpoint has {what}, which the vLLM plugin does not serve (the QuantLinears "
                                 "and QwT compensations it does): serve it with transformers (qk.load_pretrained)")
        linears = layout.get("qla_kernels.quant_linears") or {}
        if not linears:
            raise ValueError("the qla quantization_config lists no quantized linear")
        self.linears: Dict[str, Tuple[QuantConfig, Tuple[str, ...]]] = {}  # name -> (config, static buffers)
        for name, entry in linears.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict) or not isinstance(
                    entry.get("buffers", []), list):
                raise ValueError(f"{name!r}: malformed quantized-linear entry in the layout: {entry!r}")
            self.linears[name] = (QuantConfig.from_dict(entry["config"]), tuple(entry.get("buffers", [])))
        self.qwt: Dict[str, _QwTEntry] = {}
        for block, entry in (layout.get("qla_kernels.qwt") or {}).items():
            if entry.get("output_norm"):
                raise ValueError(f"{block!r}: a QwT compensation added before the block's output norm (post-norm "
                                 "blocks) has no place in vLLM's pre-norm decoders")
            try:
                (d_out, width), down = entry["weight"], entry.get("down")
                self.qwt[block] = _QwTEntry(block, int(d_out), int(down[0] if down else width),
                                            None if down is None else int(down[1]))
            except (KeyError, TypeError, ValueError, IndexError):
                raise ValueError(f"{block!r}: malformed QwT entry in the layout: {entry!r}") from None
        self._parents: Optional[_Parents] = None
        self._layers: Dict[str, "weakref.ref[nn.Module]"] = {}  # the layers given a QlaLinearMethod
        self._qwt_prefixes: Optional[Dict[str, str]] = None  # block -> the linear adding its QwT, once placed

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> List[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernels' int8 tensor cores (sm_80 and newer)

    @staticmethod
    def get_config_filenames() -> List[str]:
        return []  # the layout is config.json's quantization_config

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "QlaVllmConfig":
        if config.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"not a qla quantization_config (quant_method {config.get('quant_method')!r})")
        return cls(config.get("layout"))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        """Module names as the vLLM model names them (a model that renames HF's modules)."""
        renamed = lambda name: hf_to_vllm_mapper.map_name(f"{name}.weight").removesuffix(".weight")  # noqa: E731
        self.linears = {renamed(name): entry for name, entry in self.linears.items()}
        self.qwt = {renamed(block): dataclasses.replace(entry, block=renamed(block))
                    for block, entry in self.qwt.items()}

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """`<block>.qwt.<t>` loads as `qwt_<t>` of the linear that adds it, placed now (`_place_qwt`:
        vLLM's AutoWeightsLoader asks for this mapper once the model is built, before the weights
        load; `loaded` refuses a model whose compensations were never placed); the compensations of
        blocks on other pipeline ranks are dropped. `weight_colsum` (derived from the codes, per
        rank's K slice) is recomputed after loading."""
        if self._qwt_prefixes is None:
            self._qwt_prefixes = {block: self._place_qwt(entry) for block, entry in self.qwt.items()}
        prefixes = {f"{block}.qwt.": None if linear is None else f"{linear}.qwt_"
                    for block, linear in self._qwt_prefixes.items()}
        return super().get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_prefix=prefixes, orig_to_new_suffix={".weight_colsum": None})

    def _place_qwt(self, entry: _QwTEntry) -> Optional[str]:
        """Gives the block's compensation to the linear whose output reaches the block output by the
        residual add, and hooks the block to hand its input over; returns that linear's name (None:
        the block is on another pipeline rank). In vLLM's pre-norm decoders that linear is the last
        one the block registers with the block's output width, in a block with one norm before its
        attention and one before its MLP and no experts (a norm after the MLP, as Gemma 2 has, or a
        gate scaling a shared expert, as Qwen2-MoE has, would change what is added): anything else
        is a ValueError."""
        from vllm.distributed import get_pp_group

        inside = [(prefix, ref()) for prefix, ref in self._layers.items() if prefix.startswith(f"{entry.block}.")]
        if not inside and get_pp_group().world_size > 1:
            return None
        if not inside or inside[0][1] is None:
            raise ValueError(f"{entry.block!r} has a QwT compensation but no quantized linear")
        prefix, layer = inside[0]
        block = self._parents.ancestor(layer, prefix[len(entry.block) + 1:])
        modules = list(block.named_modules())
        outputs = [i for i, (_, module) in enumerate(modules)
                   if isinstance(module, LinearBase) and module.output_size == entry.d_out]
        if not outputs or not isinstance(modules[outputs[-1]][1].quant_method, QlaLinearMethod):
            raise ValueError(f"{entry.block!r}: its QwT compensation is added in its last linear with "
                             f"{entry.d_out} outputs, which is not quantized by qla")
        name, last = modules[outputs[-1]]
        norms = [child for child, module in block.named_children() if "Norm" in type(module).__name__]
        experts = [other for other, module in modules
                   if "MoE" in type(module).__name__ or "Experts" in type(module).__name__]
        if len(norms) != 2 or experts:
            raise ValueError(f"{entry.block!r} ({type(block).__name__}) is not a pre-norm decoder block with one norm "
                             f"before its attention and one before its MLP (norms {norms}, experts {experts[:1]}): "
                             f"the vLLM plugin adds QwT in {name!r}, whose output must be the block's update")
        last.quant_method.add_qwt(last, entry)
        block.register_forward_pre_hook(_BlockInput(block, last), with_kwargs=True)
        forward_context.scope_hooks(block)
        return f"{entry.block}.{name}"

    def loaded(self) -> None:
        """Called by every layer once the weights are loaded: no module is registered any more,
        and a compensation never placed would be silently missing."""
        if self._parents is not None:
            self._parents.stop()
        if self.qwt and self._qwt_prefixes is None:
            raise ValueError("this checkpoint has QwT compensations, which load through vLLM's AutoWeightsLoader "
                             "(the model's load_weights did not use it, or load_format skipped the weights)")

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if not isinstance(layer, (LinearBase, ParallelLMHead)):
            return None
        if self._parents is None:
            self._parents = _Parents()  # the first layer: vLLM is building the model now
        names = self._checkpoint_names(prefix)
        quantized = [name for name in names if name in self.linears]
        if not quantized:  # vLLM's own method: an fp linear, or an fp LM head (None: its embedding method)
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
        if len(quantized) != len(names):
            raise ValueError(f"{prefix}: vLLM merges {names} into one layer, and the checkpoint quantized only "
                             f"{quantized}: quantize all of them or none")
        configs = {self.linears[name][0] for name in names}
        if len(configs) != 1:
            raise ValueError(f"{prefix}: vLLM merges {names} into one GEMM, which the checkpoint quantized with "
                             f"different configs ({sorted(map(repr, configs))})")
        buffers = {self.linears[name][1] for name in names}
        if len(buffers) != 1:
            raise ValueError(f"{prefix}: {names} differ in their static activation buffers ({sorted(buffers)})")
        self._layers[prefix] = weakref.ref(layer)
        return QlaLinearMethod(configs.pop(), buffers.pop(), self, prefix)

    def _checkpoint_names(self, prefix: str) -> List[str]:
        """The checkpoint linears vLLM's layer `prefix` holds (q/k/v in qkv_proj, ...)."""
        parent, _, last = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(last)
        if not shards:
            return [prefix]
        return [f"{parent}.{shard}" if parent else shard for shard in shards]


class _Parents:
    """Which module holds which, recorded while vLLM builds the model (torch's global module
    registration hook, removed once loading is done): a quantization method is handed its layer
    only, and QwT needs the decoder block around it, whose input is the compensation's input."""

    def __init__(self):
        self.parent: "weakref.WeakKeyDictionary[nn.Module, Tuple[weakref.ref, str]]" = weakref.WeakKeyDictionary()
        self.handle = torch.nn.modules.module.register_module_module_registration_hook(self._record)

    def _record(self, module: nn.Module, name: str, submodule: Optional[nn.Module]):
        if submodule is not None:
            self.parent[submodule] = (weakref.ref(module), name)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def ancestor(self, layer: nn.Module, path: str) -> nn.Module:
        """The module that holds `layer` under the dotted `path` ("mlp.down_proj")."""
        module = layer
        for name in reversed(path.split(".")):
            link = self.parent.get(module)
            if link is None or link[1] != name or link[0]() is None:
                raise ValueError(f"cannot find the module that holds {path!r} (the QwT compensation's block)")
            module = link[0]()
        return module


class _BlockInput:
    """The forward pre-hook of a decoder block with a QwT compensation: hands its input x to the
    layer that adds the compensation. vLLM's decoders carry the residual stream beside the
    hidden states (x = hidden_states + residual; the first block gets no residual)."""

    def __init__(self, block: nn.Module, layer: nn.Module):
        names = [name for name in inspect.signature(block.forward).parameters]
        if "hidden_states" not in names or "residual" not in names:
            raise ValueError(f"{type(block).__name__}.forward takes no (hidden_states, residual): the vLLM plugin "
                             "finds a QwT block's input from those arguments")
        self.positions = names.index("hidden_states"), names.index("residual")
        self.layer = weakref.ref(layer)

    def __call__(self, block, args, kwargs):
        hidden, residual = (args[i] if i < len(args) else kwargs.get(name)
                            for i, name in zip(self.positions, ("hidden_states", "residual")))
        # the first block: vLLM's decoder keeps `hidden` as the residual, which a fused add-norm
        # later updates in place (on GPU), so the compensation reads a copy
        x = hidden.clone() if residual is None else hidden + residual
        forward_context.put(self.layer(), "qwt_input", x.reshape(-1, x.shape[-1]))


@register_weight_loader_v2_supported_method
class QlaLinearMethod(LinearMethodBase):
    """One vLLM linear layer (or LM head) on this project's fused quantized GEMM (module doc)."""

    def __init__(self, config: QuantConfig, buffers: Tuple[str, ...], owner: QlaVllmConfig, prefix: str):
        self.config, self.buffers, self.owner, self.prefix = config, buffers, owner, prefix
        self.qwt: Optional[_QwTEntry] = None  # the block compensation this layer adds (add_qwt)

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs["weight_loader"]
        n, k = sum(output_partition_sizes), input_size_per_partition
        row_parallel = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
        try:
            self.config.check_in_features(k)
        except ValueError as error:
            raise ValueError(f"{self.prefix}: this rank's {k} input features ({input_size} split over "
                             f"{layer.tp_size} ranks) do not fit {self.config}: {error}") from None
        if row_parallel and self.config.rotate is not None:
            raise ValueError(f"{self.prefix}: {self.config} rotates the whole K, which tensor parallelism splits "
                             "in this row-parallel layer: serve it with tensor_parallel_size=1")
        fmt = self.config.weight_format
        groups = k // (self.config.group_size or k)
        common = dict(output_dim=0, weight_loader=loader)
        if fmt == "int8":
            weight = ModelWeightParameter(data=torch.empty(n, k, dtype=torch.int8), input_dim=1, **common)
        else:
            weight = PackedvLLMParameter(data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, packed_dim=1,
                                         packed_factor=2, **common)
        layer.register_parameter("weight", weight)
        if fmt == "uint4_asym_groups":
            # per channel (group_size None): one group spanning K, the same on every rank
            grouped = (lambda data: GroupQuantScaleParameter(data=data, input_dim=1, **common)) \
                if self.config.group_size else (lambda data: ChannelQuantScaleParameter(data=data, **common))
            layer.register_parameter("weight_scale", grouped(torch.empty(n, groups, dtype=torch.float32)))
            layer.register_parameter("weight_zero", grouped(torch.empty(n, groups, dtype=torch.uint8)))
        else:
            layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
                data=torch.empty(n, dtype=torch.float32), **common))
        if fmt == "int4_int8_groups":
            layer.register_parameter("weight_group_scale", GroupQuantScaleParameter(
                data=torch.empty(n, groups, dtype=torch.int8), input_dim=1, **common))
        shards = len(output_partition_sizes)
        for name, dtype in (("input_scale", torch.float32), ("input_zero_point", torch.int8)):
            if name in self.buffers:
                layer.register_parameter(name, PerTensorScaleParameter(data=torch.empty(shards, dtype=dtype),
                                                                       weight_loader=loader))
        self.weight_loader = loader
        layer._qla_output_sizes = list(output_partition_sizes)

    def add_qwt(self, layer: nn.Module, entry: _QwTEntry) -> None:
        """Makes this layer add `entry`'s compensation: its tensors, to be loaded."""
        if self.qwt is not None:
            raise ValueError(f"{self.prefix} already adds the QwT compensation of {self.qwt.block!r}")
        self.qwt = entry
        n, loader, device = layer.weight.shape[0], self.weight_loader, layer.weight.device  # after vLLM's device scope
        ranks = getattr(layer, "tp_size", 1)
        if ranks > 1 and not isinstance(layer, RowParallelLinear):
            raise ValueError(f"{self.prefix}: the QwT compensation of {self.qwt.block!r} ends in a layer that splits "
                             "its outputs over ranks, whose output is not the block's")
        if self.qwt.d_in % ranks:
            raise ValueError(f"{self.prefix}: QwT's {self.qwt.d_in} input channels do not split over {ranks} ranks")
        d_in = self.qwt.d_in // ranks
        if self.qwt.rank is None:
            weight = RowvLLMParameter(data=torch.empty(n, d_in, dtype=torch.float32, device=device), input_dim=1,
                                      weight_loader=loader)
        else:
            weight = BasevLLMParameter(data=torch.empty(n, self.qwt.rank, dtype=torch.float32, device=device),
                                       weight_loader=loader)
            layer.register_parameter("qwt_down", RowvLLMParameter(
                data=torch.empty(d_in, self.qwt.rank, dtype=torch.float32, device=device), input_dim=0,
                weight_loader=loader))
        layer.register_parameter("qwt_weight", weight)
        layer.register_parameter("qwt_bias", BasevLLMParameter(data=torch.empty(n, dtype=torch.float32, device=device),
                                                               weight_loader=loader))
        if hasattr(layer, "update_param_tp_status"):  # a layer with disable_tp: its rank and size, not the group's
            layer.update_param_tp_status()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.owner.loaded()
        weight = QuantizedWeight(layer.weight.data, self.config.weight_format, layer.weight_scale.data,
                                 _data(layer, "weight_group_scale"), _data(layer, "weight_zero"),
                                 self.config.group_size)
        weight.check()
        segments, own_bias = {}, None
        if self.qwt is not None:
            key = "fullrank_w" if self.qwt.rank is None else "lowrank_u"
            layer.qwt_weight.data = layer.qwt_weight.data.to(layer.params_dtype).contiguous()  # one copy kept
            segments[key] = layer.qwt_weight.data
            if getattr(layer, "tp_rank", 0) == 0:  # added once: the all-reduce sums the ranks' outputs
                own_bias = layer.qwt_bias.data.float()
            if self.qwt.rank is not None:
                layer._qla_qwt_down = layer.qwt_down.data.contiguous()
        layer_bias = getattr(layer, "bias", None)
        # vLLM passes the layer's bias, or None (a row-parallel layer's ranks after the first).
        biases = {False: own_bias, True: None if layer_bias is None else
                  layer_bias.data.float() + (0 if own_bias is None else own_bias)}
        layer._qla_plans = []
        for rows, scale, zero in self._static_groups(layer):
            plan = self._plan(weight, rows, scale, zero, biases[False], segments)  # packed (CPU panels) once
            biased = None
            if biases[True] is not None:
                biased = dataclasses.replace(plan, bias=biases[True] if rows is None else biases[True][rows])
                biased.check()
            layer._qla_plans.append((rows, {False: plan, True: biased}))
        layer._qla_qwt_slice = self._qwt_slice(layer)
        split = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
        layer._qla_row_scale_group = (get_tp_group() if split and self.config.act_bits is not None
                                      and "input_scale" not in self.buffers else None)

    def _static_groups(self, layer: nn.Module) -> List[Tuple[Optional[slice], Optional[torch.Tensor],
                                                             Optional[torch.Tensor]]]:
        """(output rows, static input scale, zero point) per GEMM: one for the whole layer, or, where
        the linears vLLM merged were calibrated to different static scales (q/k/v observed apart),
        one per linear (a GEMM quantizes its input once)."""
        scales, zeros = _data(layer, "input_scale"), _data(layer, "input_zero_point")
        if scales is None:
            return [(None, None, None)]
        same = bool((scales == scales[0]).all()) and (zeros is None or bool((zeros == zeros[0]).all()))
        if same:
            return [(None, scales[:1].clone(), None if zeros is None else zeros[:1].clone())]
        groups, start = [], 0
        for i, size in enumerate(layer._qla_output_sizes):
            groups.append((slice(start, start + size), scales[i:i + 1].clone(),
                           None if zeros is None else zeros[i:i + 1].clone()))
            start += size
        return groups

    def _plan(self, weight: QuantizedWeight, rows: Optional[slice], scale, zero, bias, segments) -> LinearPlan:
        if rows is not None:
            weight = dataclasses.replace(weight, **{field: getattr(weight, field)[rows] for field in
                                                    ("data", "scale", "group_scale", "zero")
                                                    if getattr(weight, field) is not None})
            bias = None if bias is None else bias[rows]
        if zero is not None:
            weight = dataclasses.replace(weight, colsum=weight.integer().sum(dim=1, dtype=torch.int32))
        return LinearPlan(weight, self.config.act_bits, scale, zero, bias, **segments).frozen()

    def _qwt_slice(self, layer: nn.Module) -> Optional[slice]:
        """The channels of the block input this rank's part of W_c (or V) multiplies."""
        ranks = getattr(layer, "tp_size", 1)
        if self.qwt is None or ranks == 1:
            return None
        width = self.qwt.d_in // ranks
        return slice(layer.tp_rank * width, (layer.tp_rank + 1) * width)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = self.config.rotated(x.reshape(-1, x.shape[-1]).contiguous())
        lowrank_t = fullrank_x = None
        if self.qwt is not None:
            block_input = forward_context.take(layer, "qwt_input")
            if block_input is None:
                raise RuntimeError(f"{self.prefix} adds its block's QwT compensation but ran outside the block's call")
            if layer._qla_qwt_slice is not None:
                block_input = block_input[:, layer._qla_qwt_slice]
            if self.qwt.rank is None:
                fullrank_x = block_input.to(layer.params_dtype).contiguous()
            else:
                lowrank_t = (block_input.float() @ layer._qla_qwt_down).to(layer.params_dtype).contiguous()
        outputs = [self._run(layer, plans[bias is not None], rows, lowrank_t, fullrank_x)
                   for _, plans in layer._qla_plans]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def _run(layer: nn.Module, plan: LinearPlan, rows: torch.Tensor, lowrank_t, fullrank_x) -> torch.Tensor:
        if layer._qla_row_scale_group is None:
            return plan.run(rows, lowrank_t, fullrank_x)
        # the whole row's per-token scale, so every rank's codes are those of an unsplit layer
        absmax = layer._qla_row_scale_group.all_gather(rows.abs().amax(dim=-1, keepdim=True).float(), dim=-1).amax(-1)
        scale = absmax_scale(absmax, plan.act_bits)
        return plan.run_quantized(quantize_with_scale(rows, scale, plan.act_bits), scale, lowrank_t, fullrank_x,
                                  out_dtype=rows.dtype)


def layer_methods(model: nn.Module) -> Dict[str, str]:
    """{layer name: its quantization method's class name} of every vLLM linear layer and LM head of
    `model`: which ones run on qla's kernels (`LLM.apply_model(layer_methods)` asks every rank)."""
    return {name: type(module.quant_method).__name__ for name, module in model.named_modules()
            if isinstance(module, (LinearBase, ParallelLMHead))}


def _data(layer: nn.Module, name: str) -> Optional[torch.Tensor]:
    param = getattr(layer, name, None)
    return None if param is None else param.data
