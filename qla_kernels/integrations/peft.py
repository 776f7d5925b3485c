"""PEFT LoRA adapters on a quantized model, in the GEMM epilogue (nn/task_lora.py), without the
`peft` package: its files are read as PEFT writes them.

A PEFT LoRA directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, rank_pattern,
alpha_pattern, use_rslora, target_modules, ...) and `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] per target (a live
PeftModel's state dict names the adapter too: `.lora_A.<adapter>.weight`). Each target's scaling
is alpha / r (alpha / √r with rsLoRA), its alpha and r from the patterns where they name it; r is
read from the tensors. What cannot run as T·Uᵀ beside a quantized GEMM is refused with a
ValueError: DoRA, LoRA biases, embedding and convolution LoRAs, `modules_to_save` (whole modules
trained beside the adapter), and targets that are not QuantLinears.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..nn.task_lora import attach_loras

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# LoRA variants of peft 0.21 (tuners/lora/config.py) whose output differs from x·Aᵀ·(scaling·B)ᵀ
# on every token (aLoRA acts only after its invocation tokens; the others change the weight).
_VARIANTS = ("alora_invocation_tokens", "arrow_config", "use_bdlora", "use_qalora", "kasa_config", "monteclora_config")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # they rewrite the base at init
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def load_lora(model: nn.Module, source, name: str = "default", config: Optional[Mapping[str, Any]] = None,
              activate: bool = True) -> List[str]:
    """Attaches a PEFT LoRA adapter to the quantized `model` as adapter `name` (the base is neither
    dequantized nor merged; `set_lora` switches, `unload_lora` removes). `source`: a PEFT adapter
    directory, or a state dict of its LoRA tensors with `config` (the adapter_config.json
    contents, a dict or a peft LoraConfig). `activate`: make it the active adapter. Returns the
    layers it targets. ValueError for anything the adapter holds that cannot run on the quantized
    model (module doc), leaving the model unchanged."""
    if isinstance(source, (str, os.PathLike)):
        if config is not None:
            raise ValueError("config comes from the adapter directory's adapter_config.json: pass it only with a "
                             "state dict")
        tensors, config = _read_directory(str(source))
    elif isinstance(source, Mapping):
        if config is None:
            raise ValueError("a LoRA state dict needs its config (adapter_config.json's contents or a LoraConfig)")
        tensors = dict(source)
        config = _config_dict(config)
    else:
        raise ValueError(f"source must be a PEFT adapter directory or a state dict, got {type(source).__name__}")
    return attach_loras(model, name, lora_weights(tensors, config), activate)


def lora_weights(tensors: Dict[str, torch.Tensor], config: Mapping[str, Any]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{target module: (A, scaling·B)} of a PEFT LoRA state dict and config (module doc)."""
    if config.get("peft_type", "LORA") not in ("LORA", None):
        raise ValueError(f"only LoRA adapters run on the quantized GEMMs, got peft_type {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise ValueError("DoRA adapters rescale the merged weight's columns; they cannot run beside a quantized weight")
    variants = [key for key in _VARIANTS if config.get(key)]
    if variants:
        raise ValueError(f"this LoRA is a variant ({variants[0]}) whose output is not x·Aᵀ·(scaling·B)ᵀ on every token: "
                         "only plain LoRA runs in the quantized GEMM's epilogue")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"init_lora_weights={init!r} changed the base weights when the adapter was made, so it only "
                         "fits that changed base: save it converted to a plain LoRA (PEFT's "
                         "path_initial_model_for_weight_conversion) and load that")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA biases (bias={config.get('bias')!r}) change the base layers' biases: not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"modules_to_save {config['modules_to_save']} are whole modules trained beside the adapter: "
                         "not supported (load them into the model's own fp modules yourself)")
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"a LoRA state dict maps names to tensors, got {key!r}: {type(tensor).__name__}")
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a LoRA linear weight (embedding / convolution LoRAs, DoRA magnitudes "
                             "and other PEFT tensors are not supported)")
        adapters.add(match["adapter"])
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    if len(adapters) > 1:
        raise ValueError(f"the state dict holds several adapters ({sorted(a or '' for a in adapters)}): pass one")
    if not pairs:
        raise ValueError("the adapter has no LoRA weights")
    weights = {}
    for module, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{module!r} has lora_{''.join(parts)} but not lora_{'B' if 'A' in parts else 'A'}")
        down, up = parts["A"], parts["B"]
        if down.dim() != 2 or up.dim() != 2:
            raise ValueError(f"{module!r}: lora_A and lora_B must be 2-D (linear LoRAs), got {tuple(down.shape)} and "
                             f"{tuple(up.shape)}")
        rank = down.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        expected_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        if expected_rank != rank or up.shape[1] != rank or rank == 0:
            raise ValueError(f"{module!r}: the config gives r={expected_rank}, its tensors rank {rank} / {up.shape[1]}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"{module!r}: lora_alpha must be a number, got {alpha!r}")
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        weights[module] = (down.float(), up.float() * scaling)
    return weights


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """PEFT's rule: the first pattern that matches the module name's end wins."""
    if not isinstance(patterns, Mapping):
        raise ValueError(f"rank_pattern / alpha_pattern must map patterns to values, got {patterns!r}")
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except (re.error, TypeError) as error:
            raise ValueError(f"the pattern {pattern!r} is not a regular expression ({error})") from None
    return default


def _config_dict(config) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise ValueError(f"config must be a dict or a peft LoraConfig, got {type(config).__name__}")


def _read_directory(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    try:
        with open(os.path.join(path, CONFIG_FILE)) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a PEFT adapter directory ({CONFIG_FILE}: {error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}/{CONFIG_FILE} must hold a JSON object")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise ValueError(f"{path} has no {WEIGHTS_FILE} (adapters saved as pickles, adapter_model.bin, are not read)")
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error})") from None
    return tensors, config
