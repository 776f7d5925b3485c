"""Hugging Face transformers: `quant_method: "qla"`, so `save_pretrained` / `from_pretrained` keep a
qla model quantized.

- `model.save_pretrained(dir)` after `qk.quantize_` (+ QwT, QLA): config.json carries a
  `quantization_config` whose `layout` is `nn.serialization.quantized_layout(model)`, the weights
  are the model's state dict as it is (packed codes, scales, adapters), sharded as transformers
  shards (`max_shard_size`). `quantize_` (and every path that quantizes) attaches the quantizer
  to a `PreTrainedModel`, which is what makes transformers ask it at save time.
- `AutoModel*.from_pretrained(dir)`: on the meta-device skeleton the quantizer rebuilds the
  layout's modules under the checkpoint's own names (so the tensors load as they are, no
  conversion), checks the checkpoint's headers for every tensor those modules own (name, shape,
  dtype) before anything is read, and after loading converts the model to its runtime form
  (`convert_for_runtime`, level one: frozen per-GEMM plans). A model dispatched by accelerate with
  offloaded weights (`device_map` with "cpu" beside an accelerator, or "disk") keeps the
  calibration form: its weights move per call, a frozen plan would hold stale tensors; its
  QLA-adapted blocks load all their tensors per call (`_load_adapted_blocks_whole`).
- `load_pretrained(dir)`: `from_pretrained` that refuses a directory that is not a qla model and a
  result that is not quantized as its config says (e.g. "qla" not registered in that process).

Quantizing at load (`from_pretrained(fp_dir, quantization_config=QlaConfig())`) is not offered:
the methods need calibration data. transformers refuses it (`requires_calibration`).
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..models.runtime import convert_for_runtime
from ..nn.quant_linear import QuantLinear
from ..nn.quantize import on_quantized
from ..nn.serialization import check_layout_version, check_tensors, quantized_layout, rebuild
from ..nn.weight_reads import route_weight_reads

QUANT_METHOD = "qla"
_QUANTIZED_ONLY_BUFFERS = {"weight_scale", "weight_zero", "weight_group_scale", "weight_colsum", "input_scale",
                           "input_zero_point"}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class QlaConfig(QuantizationConfigMixin):
    """The `quantization_config` of a qla model in config.json: its `layout`, what `rebuild` needs
    to turn the fp architecture into the quantized one (written at save time from the model)."""

    def __init__(self, layout: Optional[Dict[str, Any]] = None, **kwargs):
        if layout is not None and not isinstance(layout, dict):
            raise ValueError(f"layout must be a dict (quantized_layout), got {type(layout).__name__}")
        self.quant_method = QUANT_METHOD
        self.layout = layout or {}

    def to_dict(self) -> Dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "layout": self.layout}


class QlaHfQuantizer(HfQuantizer):
    """Rebuilds a qla model's modules before its weights load and converts it after (module doc)."""

    requires_calibration = True
    quantization_config: QlaConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        source = _source(checkpoint_files)
        check_layout_version(self.quantization_config.layout, source)
        layout, dropped = layout_in(model, self.quantization_config.layout)
        before = set(model.state_dict())
        rebuild(model, layout, source)
        _untie_quantized(model)
        if checkpoint_files:
            dropped = [f"{name}." for name in dropped]
            specs = {key: spec for key, spec in self._as_loaded(model, _checkpoint_specs(checkpoint_files)).items()
                     if not any(key.startswith(prefix) for prefix in dropped)}
            own = model.state_dict()
            # Beside qla's own tensors, every tensor of the file that only a quantized layer has or
            # that is an integer where the model holds floats: a layer the layout left out.
            checked = _owned_keys(model, before, layout) | {
                key for key, (_, dtype) in specs.items()
                if any(key.startswith(prefix) for prefix in _owned_prefixes(layout))
                or key.rpartition(".")[2] in _QUANTIZED_ONLY_BUFFERS
                or (key in own and own[key].is_floating_point() and not dtype.is_floating_point)}
            check_tensors(model, specs, source, keys=checked)
        return model

    def _as_loaded(self, model: nn.Module, specs: dict) -> dict:
        """The checkpoint's (shape, dtype) by the name each tensor loads into, as transformers renames
        them (its conversion mapping: ViT's checkpoints keep the names of before its module
        renames; the base model prefix dropped or added). A tensor that a converter merges or splits
        is left out (it is not one of qla's)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model, None, self)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        own = model.state_dict()
        renamed = {}
        for key, spec in specs.items():
            name, converted = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None), own)
            if name not in own and key in own:  # the loader's fallback: a renaming that misses keeps the name
                name = key
            if converted is None:
                renamed[name] = spec
        return renamed

    def _process_model_after_weight_loading(self, model, **kwargs):
        offloaded = _offloaded(model)
        if offloaded and not all(getattr(module._hf_hook, "offload_buffers", True) for module in model.modules()
                                 if getattr(getattr(module, "_hf_hook", None), "offload", False)):
            warnings.warn("a qla model's quantized weights are buffers, which accelerate offloads only with "
                          "offload_buffers=True: pass it to from_pretrained, or the offloaded layers keep their "
                          "codes and scales on the execution device")
        if offloaded and getattr(model, "_qla_placement", None) is not None:
            _load_adapted_blocks_whole(model)
        route_weight_reads(model, (QuantLinear,))
        if not offloaded:
            convert_for_runtime(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def get_state_dict_and_metadata(self, model):
        """Called by `save_pretrained` before it writes config.json: the layout of the model as it
        is now (QwT and QLA may have been added since `quantize_`)."""
        self.quantization_config.layout = quantized_layout(model)
        model.config.quantization_config = self.quantization_config
        return None, {}


def _source(checkpoint_files) -> str:
    if not checkpoint_files:
        return "from_pretrained"
    return os.path.dirname(checkpoint_files[0]) or checkpoint_files[0]


def _owned_prefixes(layout: dict) -> List[str]:
    """The module paths whose tensors qla wrote: its linears, its QwT compensations' `qwt`."""
    names = list(layout.get("qla_kernels.quant_linears", {}))
    names += [f"{block}.qwt" for block in layout.get("qla_kernels.qwt", {})]
    return [f"{name}." for name in names]


def _owned_keys(model: nn.Module, before: set, layout: dict) -> set:
    """State-dict keys of the modules `rebuild` made: under a quantized linear or new (QwT, adapters)."""
    prefixes = _owned_prefixes(layout)
    return {key for key in model.state_dict() if key not in before or any(key.startswith(p) for p in prefixes)}


def _checkpoint_specs(files: Iterable[str]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor in the safetensors `files`, read from their headers only."""
    specs = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path}: a qla model is stored as safetensors (save_pretrained writes them)")
        try:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{path}: {name!r} has dtype {piece.get_dtype()}, which no qla tensor has")
                    specs[name] = (tuple(piece.get_shape()), dtype)
        except (OSError, SafetensorError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    return specs


def _renamed(model: nn.Module, names: Iterable[str]) -> Dict[str, Optional[str]]:
    """Each name (of a module or tensor, as saved) under the model's own name, or None where the
    model has no such part: transformers drops or adds the base model prefix when a base model
    loads a head model's checkpoint or the reverse (BertModel ↔ BertForSequenceClassification)."""
    prefix = getattr(model, "base_model_prefix", "")
    own = set(dict(model.named_modules())) | set(model.state_dict())
    renamed = {}
    for name in names:
        if name in own or not prefix:
            renamed[name] = name
        elif name.startswith(f"{prefix}.") and name.removeprefix(f"{prefix}.") in own:
            renamed[name] = name.removeprefix(f"{prefix}.")
        elif f"{prefix}.{name}" in own:
            renamed[name] = f"{prefix}.{name}"
        elif not name.startswith(f"{prefix}.") and any(key.startswith(f"{prefix}.") for key in names):
            renamed[name] = None  # a head the base model loading this checkpoint does not have
        else:
            renamed[name] = name  # rebuild or the check names it
    return renamed


def layout_in(model: nn.Module, layout: dict) -> Tuple[dict, List[str]]:
    """(`layout` under `model`'s module names, the saved names of the linears the model does not
    have: a head left out when a base model loads a head model's checkpoint; see _renamed)."""
    layout = dict(layout)
    dropped: List[str] = []
    for key in ("qla_kernels.quant_linears", "qla_kernels.qwt", "qla_kernels.quant_attention"):
        entries = layout.get(key)
        if isinstance(entries, dict):
            names = _renamed(model, list(entries))
            layout[key] = {names[name]: entry for name, entry in entries.items() if names[name] is not None}
            if key == "qla_kernels.quant_linears":
                dropped = [name for name in entries if names[name] is None]
    adapters = layout.get("qla_kernels.qla")
    if isinstance(adapters, dict) and isinstance(adapters.get("blocks"), list):
        names = _renamed(model, adapters["blocks"])
        layout["qla_kernels.qla"] = dict(adapters, blocks=[names[name] for name in adapters["blocks"]
                                                           if names[name] is not None])
    return layout, dropped


def _untie_quantized(model: nn.Module) -> None:
    """Drops the tied-weight entries (transformers' `all_tied_weights_keys`, per model and submodel)
    that name a QuantLinear's weight: GPT-2's and tied LLaMAs' lm_head is quantized with its own
    codes, while the embedding stays in floating point, so tying them would overwrite one with the
    other (or fail: the codes are a buffer, not a parameter)."""
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for prefix, module in model.named_modules():
        tied = getattr(module, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        base = f"{prefix}." if prefix else ""
        for target, source in list(tied.items()):
            if any(f"{base}{key}".rpartition(".")[0] in quantized for key in (target, source)):
                del tied[target]
                # tie_weights() (resize_token_embeddings calls it) rebuilds the mapping from the config.
                for config in {id(c): c for c in (module.config, module.config.get_text_config())}.values():
                    config.tie_word_embeddings = False


def _offloaded(model: nn.Module) -> bool:
    """Whether accelerate moves this model's weights per call (offload hooks)."""
    return any(getattr(getattr(module, "_hf_hook", None), "offload", False) for module in model.modules())


def _load_adapted_blocks_whole(model: nn.Module) -> None:
    """Makes accelerate place every offloaded QLA-adapted block's weights at the block's call.

    accelerate moves an offloaded module's own tensors in when its forward is called, module by
    module; the QLA hooks read their adapters' tensors directly (the gate, the depthwise weight of
    the fused down path) from inside the block's call, where no adapter forward ran. Re-hooking
    each such block as accelerate's `preload_module_classes` would (one hook on the block,
    `place_submodules`) loads all of the block's tensors for its call, adapters included."""
    from accelerate.hooks import attach_align_device_hook, remove_hook_from_submodules

    for name in model._qla_block_names:
        block = model.get_submodule(name)
        holders = [module for module in block.modules()
                   if next(itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)), None) is not None]
        hooks = [getattr(module, "_hf_hook", None) for module in holders]
        offloading = [hook for hook in hooks if getattr(hook, "offload", False)]
        if not offloading:
            continue
        leaf = offloading[0]
        dataset = getattr(leaf.weights_map, "dataset", None)
        if dataset is None or len(offloading) != len(holders) or any(
                hook.execution_device != leaf.execution_device or getattr(hook.weights_map, "dataset", None) is not dataset
                for hook in offloading):
            raise ValueError(f"{name!r} carries QLA adapters and is offloaded only in part (or to several devices): "
                             "give the whole block one device_map entry")
        remove_hook_from_submodules(block)
        attach_align_device_hook(block, execution_device=leaf.execution_device, offload=True, weights_map=dataset,
                                 offload_buffers=leaf.offload_buffers, module_name=name,
                                 skip_keys=leaf.skip_keys, preload_module_classes=[type(block).__name__],
                                 tied_params_map=leaf.tied_params_map)


def _attach_quantizer(model: nn.Module) -> None:
    """Makes `save_pretrained` of a model quantized here ask our quantizer (on_quantized listener)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        _untie_quantized(model)
        if not isinstance(getattr(model, "hf_quantizer", None), QlaHfQuantizer):
            model.hf_quantizer = QlaHfQuantizer(QlaConfig(), pre_quantized=True)


def register() -> None:
    """Registers "qla" with transformers (idempotent) and attaches the quantizer to models
    quantized from now on."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QlaConfig:
        if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
            warnings.warn(f"transformers already had a {QUANT_METHOD!r} quantization method: qla_kernels replaces it")
            AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD)
            AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(QlaConfig)
        register_quantizer(QUANT_METHOD)(QlaHfQuantizer)
    on_quantized(_attach_quantizer)


def load_pretrained(path: str, model_class=None, runtime_form: bool = True, **kwargs) -> nn.Module:
    """`model_class.from_pretrained(path, **kwargs)` (default: the class config.json's architecture
    names, else AutoModel) for a qla directory, refusing to return it unquantized: a directory
    without a qla `quantization_config`, or a loaded model without every QuantLinear its layout
    lists (the method not registered in this process, or another quantizer took over), is a
    ValueError. `runtime_form=False`: the calibration form (to calibrate or train further)
    instead of the converted model from_pretrained returns."""
    if not isinstance(runtime_form, bool):
        raise ValueError(f"runtime_form must be a bool, got {runtime_form!r}")
    config_path = os.path.join(str(path), "config.json")
    try:
        with open(config_path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a saved Hugging Face model directory ({error})") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} is not a qla model: its config.json has no quantization_config with "
                         f"quant_method {QUANT_METHOD!r} (quantize the fp model with qk.quantize_, then save_pretrained)")
    if model_class is None:
        model_class = _auto_class(config)
    model = model_class.from_pretrained(path, **kwargs)
    expected = set(layout_in(model, quantization.get("layout", {}))[0].get("qla_kernels.quant_linears", {}))
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    missing = sorted(expected - quantized)
    if missing or not expected or not isinstance(getattr(model, "hf_quantizer", None), QlaHfQuantizer):
        raise ValueError(f"{path} loaded without its quantization ({len(missing)} of {len(expected)} QuantLinears "
                         f"missing{', e.g. ' + repr(missing[0]) if missing else ''}): is the 'qla' method registered "
                         "with transformers in this process (import qla_kernels first)?")
    if not runtime_form:
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.thaw()
    return model


def _auto_class(config: dict):
    import transformers

    for architecture in config.get("architectures") or []:
        model_class = getattr(transformers, architecture, None)
        if model_class is not None:
            return model_class
    return transformers.AutoModel
