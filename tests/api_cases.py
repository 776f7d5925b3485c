"""Adversarial cases through the public API, as a careful user would try them, and how each ended.

    python -m tests.api_cases        # the table of outcomes (run from the repository root)

Every case is a call and what it should do: raise a ValueError (bad input; and then leave the
model it was given as it was) or succeed (valid input, with an optional check of the result).
A case ends in one of:

    intended ValueError   bad input refused with a ValueError, the model unchanged
    correct               valid input accepted, its check passed
    other exception       bad or valid input raised something else than ValueError
    silent result         bad input accepted (no error)
    half-done             ValueError, but the model was changed
    refused valid input   valid input raised a ValueError
    wrong result          valid input accepted, its check failed

`tests/test_api_cases.py` asserts that every case ends intended or correct.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import qla_kernels as qk

OUTCOMES = ("intended ValueError", "correct", "other exception", "silent result", "half-done", "refused valid input",
            "wrong result")


@dataclasses.dataclass
class Case:
    area: str
    name: str
    call: Callable[[], object]
    bad: bool  # True: must raise ValueError
    model: Optional[Callable[[], nn.Module]] = None  # the model the call changes: checked unchanged after an error
    check: Optional[Callable[[object], bool]] = None  # for valid input: the result is right


def _snapshot(model: nn.Module):
    return ([(name, type(module)) for name, module in model.named_modules()],
            {key: value.detach().clone() for key, value in model.state_dict().items()})


def _same(before, after) -> bool:
    (modules_a, state_a), (modules_b, state_b) = before, after
    return modules_a == modules_b and state_a.keys() == state_b.keys() and all(
        state_a[key].dtype == state_b[key].dtype and state_a[key].shape == state_b[key].shape
        and torch.equal(state_a[key], state_b[key]) for key in state_a)


def outcome(case: Case) -> str:
    model = case.model() if case.model is not None else None
    before = _snapshot(model) if model is not None else None
    try:
        result = case.call(model) if model is not None else case.call()
    except ValueError:
        if not case.bad:
            return "refused valid input"
        return "half-done" if model is not None and not _same(before, _snapshot(model)) else "intended ValueError"
    except Exception:  # noqa: BLE001  (the point: any other type is a finding)
        return "other exception"
    if case.bad:
        return "silent result"
    return "correct" if case.check is None or case.check(result) else "wrong result"


def error_message(case: Case) -> Optional[str]:
    """The ValueError's message of a case's call (None: no ValueError)."""
    try:
        case.call(case.model()) if case.model is not None else case.call()
    except ValueError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Cases

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))


def _quantized(config=None):
    return lambda: qk.quantize_(_mlp(), config or qk.W8A8())


BAD_SIZES = [0, -2, 2.5, 32.0, "64", True, None, [64]]
BAD_GROUPS = [0, -32, 24, 8, 32.0, "32", True, [32]]
BAD_BITS = [0, 1, 9, 16, 4.0, "8", True, None]


def config_cases() -> List[Case]:
    cases = []
    for config_type, group in itertools.product((qk.W4A8, qk.W4A16), BAD_GROUPS):
        cases.append(Case("configs", f"{config_type.__name__}(group_size={group!r})",
                          lambda c=config_type, g=group: c(group_size=g), True))
    for config_type in (qk.W4A8, qk.W4A16):
        for group in (16, 32, 128):
            cases.append(Case("configs", f"{config_type.__name__}(group_size={group})",
                              lambda c=config_type, g=group: c(group_size=g), False,
                              check=lambda config, g=group: config.group_size == g))
    for config_type in (qk.W8A8, qk.W4A4):
        cases.append(Case("configs", f"{config_type.__name__}(group_size=32)",
                          lambda c=config_type: c(group_size=32), True))
        cases.append(Case("configs", f"{config_type.__name__}()", config_type, False))
    stored = [{}, {"name": "W5A5"}, {"name": "W4A16", "group_size": "a"}, {"name": "W4A16", "bits": 3}, "W8A8", None, 3,
              {"name": "W8A8", "group_size": 32}]
    for value in stored:
        cases.append(Case("configs", f"from_dict({value!r})", lambda v=value: qk.QuantConfig.from_dict(v), True))
    for config in (qk.W8A8(), qk.W4A8(group_size=32), qk.W4A16(group_size=64), qk.W4A4()):
        cases.append(Case("configs", f"from_dict(to_dict({config}))",
                          lambda c=config: qk.QuantConfig.from_dict(c.to_dict()), False,
                          check=lambda result, c=config: result == c))
    return cases


def quant_linear_cases() -> List[Case]:
    cases = []
    for which, value in itertools.product(("in_features", "out_features"), BAD_SIZES):
        sizes = {"in_features": 64, "out_features": 32, which: value}
        cases.append(Case("QuantLinear", f"QuantLinear({which}={value!r})",
                          lambda s=sizes: qk.QuantLinear(s["in_features"], s["out_features"], config=qk.W8A8()), True))
    for config in ("w8a8", qk.W8A8, None, 3):
        cases.append(Case("QuantLinear", f"QuantLinear(config={config!r})",
                          lambda c=config: qk.QuantLinear(64, 32, config=c), True))
    for config, k in ((qk.W4A16(group_size=32), 48), (qk.W4A8(group_size=32), 40), (qk.W4A8(), 63),
                      (qk.W4A16(group_size=128), 64)):
        cases.append(Case("QuantLinear", f"QuantLinear({k}, 32, {config})",
                          lambda c=config, k=k: qk.QuantLinear(k, 32, config=c), True))
    for module in (nn.Conv2d(3, 8, 3), nn.LayerNorm(8), nn.Embedding(10, 8)):
        cases.append(Case("QuantLinear", f"from_float({type(module).__name__})",
                          lambda m=module: qk.QuantLinear.from_float(m, qk.W8A8()), True))
    layer = lambda: qk.QuantLinear.from_float(nn.Linear(64, 32), qk.W8A8())  # noqa: E731
    inputs = {"int tensor": lambda: torch.ones(4, 64, dtype=torch.int32), "float64": lambda: torch.randn(4, 64).double(),
              "bool": lambda: torch.ones(4, 64, dtype=torch.bool), "wrong width": lambda: torch.randn(4, 63),
              "0-d": lambda: torch.tensor(1.0), "list": lambda: [[0.0] * 64] * 4, "numpy": lambda: torch.randn(4, 64).numpy(),
              "meta device": lambda: torch.randn(4, 64, device="meta"), "None": lambda: None}
    for name, make in inputs.items():
        cases.append(Case("QuantLinear", f"forward({name})", lambda m=make: layer()(m()), True))
    valid = {"fp32 [4, 64]": (torch.float32, (4, 64)), "fp16 [2, 3, 64]": (torch.float16, (2, 3, 64)),
             "bf16 [1, 64]": (torch.bfloat16, (1, 64)), "no rows [0, 64]": (torch.float32, (0, 64))}
    for name, (dtype, shape) in valid.items():
        cases.append(Case("QuantLinear", f"forward({name})",
                          lambda d=dtype, s=shape: layer()(torch.randn(s).to(d)), False,
                          check=lambda y, d=dtype, s=shape: y.dtype == d and tuple(y.shape) == (*s[:-1], 32)))
    cases.append(Case("QuantLinear", "forward(NaN row) propagates", lambda: layer()(torch.full((2, 64), float("nan"))),
                      False, check=lambda y: bool(torch.isnan(y).all())))
    scales = {"negative": -0.1, "zero": 0.0, "inf": float("inf"), "nan": float("nan"), "two values": torch.tensor([0.1, 0.2]),
              "string": "a", "empty": torch.tensor([])}
    for name, scale in scales.items():
        cases.append(Case("QuantLinear", f"set_static_activation(scale {name})",
                          lambda m, s=scale: m[0].set_static_activation(s), True, model=_quantized()))
    zeros = {"out of range": 300, "float": 1.5, "two values": torch.tensor([1, 2]), "string": "z"}
    for name, zero in zeros.items():
        cases.append(Case("QuantLinear", f"set_static_activation(zero point {name})",
                          lambda m, z=zero: m[0].set_static_activation(0.05, z), True, model=_quantized()))
    cases.append(Case("QuantLinear", "set_static_activation on W4A16",
                      lambda m: m[0].set_static_activation(0.05), True, model=_quantized(qk.W4A16(group_size=32))))
    cases.append(Case("QuantLinear", "set_static_activation(0.05, -12)",
                      lambda m: m[0].set_static_activation(0.05, -12), False, model=_quantized(),
                      check=lambda _: True))
    return cases


def quantize_cases() -> List[Case]:
    cases = [
        Case("quantize_", "a tensor", lambda: qk.quantize_(torch.randn(3), qk.W8A8()), True),
        Case("quantize_", "a linear itself", lambda: qk.quantize_(nn.Linear(8, 8), qk.W8A8()), True),
        Case("quantize_", "config as a string", lambda m: qk.quantize_(m, "w8a8"), True, model=_mlp),
        Case("quantize_", "config class, not an instance", lambda m: qk.quantize_(m, qk.W8A8), True, model=_mlp),
        Case("quantize_", "filter selecting nothing", lambda m: qk.quantize_(m, qk.W8A8(), lambda *a: False), True,
             model=_mlp),
        Case("quantize_", "already quantized", lambda m: qk.quantize_(m, qk.W4A8()), True, model=_quantized()),
        Case("quantize_", "one layer cannot take the groups", lambda m: qk.quantize_(m, qk.W4A16(group_size=64)), True,
             model=_mlp),  # fc2's K = 96 is no multiple of 64: nothing is swapped
        Case("quantize_", "model without linears", lambda m: qk.quantize_(m, qk.W8A8()), True,
             model=lambda: nn.Sequential(nn.ReLU(), nn.LayerNorm(4))),
    ]
    for config in (qk.W8A8(), qk.W4A8(), qk.W4A8(group_size=32), qk.W4A16(group_size=32), qk.W4A4()):
        cases.append(Case("quantize_", f"MLP with {config}", lambda c=config: _run_quantized(c), False,
                          check=lambda error, c=config: error < _error_bound(c)))
    shared = lambda: nn.Sequential(*(2 * [nn.Linear(16, 16)]))  # noqa: E731
    cases.append(Case("quantize_", "a linear registered twice", lambda: qk.quantize_(shared(), qk.W8A8()), False,
                      check=lambda model: model[0] is model[1] and isinstance(model[0], qk.QuantLinear)))
    return cases


def _run_quantized(config) -> float:
    fp = _mlp()
    x = torch.randn(8, 64)
    with torch.no_grad():
        reference = fp(x)
        return float((qk.quantize_(copy.deepcopy(fp), config)(x) - reference).norm() / reference.norm())


def _error_bound(config) -> float:
    """Relative output error the MLP's two layers may show: a b-bit max-abs rounding of a row whose
    max is about 3σ errs by 3σ / (qmax·√12) (RMS), its two weights and two activations add in
    quadrature, and 1.5× covers the spread of the max (observed: 0.011 at W8A8, 0.19–0.21 at W4A4)."""
    def rounding(bits):
        return 0.0 if bits is None else 3 / ((2 ** (bits - 1) - 1) * 12 ** 0.5)
    return 1.5 * (2 * rounding(config.weight_bits) ** 2 + 2 * rounding(config.act_bits) ** 2) ** 0.5


def op_cases() -> List[Case]:
    cases = []
    x = torch.randn(4, 64)
    for backend in ("reference", "simulate", "cpu"):
        if not qk.backends()[backend].available:
            continue
        under = lambda fn, b=backend: _under(b, fn)  # noqa: E731
        for bits in BAD_BITS:
            cases.append(Case(f"ops ({backend})", f"quantize_activation(bits={bits!r})",
                              lambda b=bits, u=under: u(lambda: qk.ops.quantize_activation(x, b)), True))
        bad_inputs = {"K = 0": torch.randn(3, 0), "3-D": torch.randn(2, 3, 64), "int": torch.ones(4, 64, dtype=torch.int32)}
        for name, value in bad_inputs.items():
            cases.append(Case(f"ops ({backend})", f"quantize_activation({name})",
                              lambda v=value, u=under: u(lambda: qk.ops.quantize_activation(v)), True))
        statics = {"two scales": (torch.tensor([0.1, 0.2]), None), "fp64 scale": (torch.tensor([0.1], dtype=torch.float64), None),
                   "zero point without scale": (None, torch.tensor([1], dtype=torch.int8)),
                   "float zero point": (torch.tensor([0.1]), torch.tensor([1.0]))}
        for name, (scale, zero) in statics.items():
            cases.append(Case(f"ops ({backend})", f"quantize_activation({name})",
                              lambda s=scale, z=zero, u=under: u(
                                  lambda: qk.ops.quantize_activation(x, 8, static_scale=s, zero_point=z)), True))
        weight = qk.quant.quantize_weight(torch.randn(32, 64), qk.W8A8())
        shapes = {"x of another width": torch.randn(4, 48), "1-D x": torch.randn(64)}
        for name, value in shapes.items():
            cases.append(Case(f"ops ({backend})", f"quantized_linear({name})",
                              lambda v=value, u=under: u(lambda: qk.ops.quantized_linear(v, weight, 8)), True))
        segments = {"T without U": dict(lowrank_t=torch.randn(4, 8)),
                    "U of another rank": dict(lowrank_t=torch.randn(4, 8), lowrank_u=torch.randn(32, 4)),
                    "residual of another shape": dict(residual=torch.randn(4, 31)),
                    "bias of another width": dict(bias=torch.randn(31))}
        for name, extra in segments.items():
            cases.append(Case(f"ops ({backend})", f"quantized_linear({name})",
                              lambda e=extra, u=under: u(lambda: qk.ops.quantized_linear(x, weight, 8, **e)), True))
        cases.append(Case(f"ops ({backend})", "quantized_linear with every segment",
                          lambda u=under: u(lambda: qk.ops.quantized_linear(
                              x, weight, 8, bias=torch.randn(32), lowrank_t=torch.randn(4, 8), lowrank_u=torch.randn(32, 8),
                              residual=torch.randn(4, 32))), False, check=lambda y: tuple(y.shape) == (4, 32)))
    cases.append(Case("ops", "use_backend('gpu')", lambda: _under("gpu", lambda: None), True))
    return cases


def _under(backend: str, fn):
    with qk.use_backend(backend):
        return fn()


def checkpoint_cases() -> List[Case]:
    directory = tempfile.mkdtemp(prefix="qla_api_cases_")
    atexit.register(shutil.rmtree, directory, True)
    model = qk.quantize_(_mlp(), qk.W8A8())
    good = os.path.join(directory, "good.safetensors")
    qk.save_quantized(model, good)
    raw = open(good, "rb").read()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_size])
    files = {"truncated": raw[: len(raw) // 2], "empty": b"", "not safetensors": b"hello world" * 10}

    def edited(edit) -> bytes:
        changed = copy.deepcopy(header)
        edit(changed)
        text = json.dumps(changed).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + raw[8 + header_size:]

    def meta(key, value):
        return lambda h: h["__metadata__"].__setitem__(key, value)

    layers = json.loads(header["__metadata__"]["qla_kernels.quant_linears"])
    files.update({
        "scale relabelled I32": edited(lambda h: h["0.weight_scale"].__setitem__("dtype", "I32")),
        "foreign metadata": edited(lambda h: h.__setitem__("__metadata__", {"format": "pt"})),
        "version 99": edited(meta("qla_kernels.format_version", "99")),
        "layout not JSON": edited(meta("qla_kernels.quant_linears", "{")),
        "in_features 2**42": edited(meta("qla_kernels.quant_linears", json.dumps(
            dict(layers, **{"0": dict(layers["0"], in_features=2 ** 42)})))),
        "unknown config": edited(meta("qla_kernels.quant_linears", json.dumps(
            dict(layers, **{"0": dict(layers["0"], config={"name": "W3A3"})})))),
        "alias to a missing tensor": edited(meta("qla.aliases", json.dumps({"2.bias": "nothing"}))),
        "a layer not in the model": edited(meta("qla_kernels.quant_linears", json.dumps(dict(layers, **{"5": layers["0"]})))),
    })
    cases = []
    for name, content in files.items():
        path = os.path.join(directory, f"{name}.safetensors")
        with open(path, "wb") as handle:
            handle.write(content)
        cases.append(Case("load_quantized", name, lambda m, p=path: qk.load_quantized(m, p), True, model=_mlp))
    skeletons = {"deeper": lambda: nn.Sequential(*_mlp(), nn.Linear(32, 32)),
                 "wider": lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)),
                 "other head": lambda: nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 16)),
                 "norm instead of linear": lambda: nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.LayerNorm(96))}
    for name, skeleton in skeletons.items():
        cases.append(Case("load_quantized", f"skeleton {name}", lambda m: qk.load_quantized(m, good), True,
                          model=skeleton))
    with torch.device("meta"):
        meta_skeleton = _mlp()
    cases.append(Case("load_quantized", "meta-device skeleton", lambda: qk.load_quantized(meta_skeleton, good), True))
    cases.append(Case("load_quantized", "not a module", lambda: qk.load_quantized("model", good), True))
    cases.append(Case("load_quantized", "missing file", lambda m: qk.load_quantized(m, good + ".missing"), True,
                      model=_mlp))
    x = torch.randn(4, 64)
    cases.append(Case("load_quantized", "round trip", lambda m: qk.load_quantized(m, good)(x), False, model=_mlp,
                      check=lambda y: torch.equal(y, model(x))))
    return cases


def lora_cases() -> List[Case]:
    layer = "0"
    good = {f"base_model.model.{layer}.lora_A.weight": torch.randn(4, 64),
            f"base_model.model.{layer}.lora_B.weight": torch.randn(96, 4)}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}

    def with_(**changes):
        return dict(good, **changes)

    bad = {
        "no config": (good, None),
        "DoRA": (good, dict(config, use_dora=True)),
        "rank mismatch": (good, dict(config, r=8)),
        "A of another width": (with_(**{f"base_model.model.{layer}.lora_A.weight": torch.randn(4, 63)}), config),
        "only A": ({k: v for k, v in good.items() if "lora_A" in k}, config),
        "NaN in B": (with_(**{f"base_model.model.{layer}.lora_B.weight": torch.full((96, 4), float("nan"))}), config),
        "embedding LoRA": ({"base_model.model.emb.lora_embedding_A": torch.randn(4, 10)}, config),
        "a module not in the model": ({k.replace(".0.", ".7."): v for k, v in good.items()}, config),
        "a GELU target": ({k.replace(".0.", ".1."): v for k, v in good.items()}, config),
        "empty": ({}, config),
        "alpha null": (good, dict(config, lora_alpha=None)),
        "rank pattern not a regex": (good, dict(config, rank_pattern={"(": 4})),
        "a list for a tensor": (with_(**{f"base_model.model.{layer}.lora_B.weight": [[0.0] * 4] * 96}), config),
        "an int key": ({**good, 3: torch.zeros(1)}, config),
    }
    cases = [Case("load_lora", name, lambda m, s=state, c=cfg: qk.load_lora(m, s, config=c), True, model=_quantized())
             for name, (state, cfg) in bad.items()]
    cases.append(Case("load_lora", "a list", lambda m: qk.load_lora(m, [1, 2]), True, model=_quantized()))
    cases.append(Case("load_lora", "set_lora of an unknown name", lambda m: qk.set_lora(m, "x"), True,
                      model=_quantized()))
    def with_x():
        model = _quantized()()
        qk.load_lora(model, good, name="x", config=config)
        return model

    on_fc2 = {key.replace(".0.", ".2."): torch.randn(32, 4) if "lora_B" in key else torch.randn(4, 96) for key in good}
    cases.append(Case("load_lora", "a name loaded on other layers",
                      lambda m: qk.load_lora(m, on_fc2, name="x", config=config), True, model=with_x))
    cases.append(Case("load_lora", "valid adapter", lambda m: qk.load_lora(m, good, config=config), False,
                      model=_quantized(), check=lambda names: names == [layer]))
    return cases


def pretrained_cases() -> List[Case]:
    """save_pretrained directories with a config.json edited against their weights."""
    import transformers

    def bert():
        torch.manual_seed(0)
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=100)
        return transformers.BertModel(config).eval()

    directory = tempfile.mkdtemp(prefix="qla_api_cases_hf_")
    atexit.register(shutil.rmtree, directory, True)
    model = qk.quantize_(bert(), qk.W8A8())
    model.save_pretrained(os.path.join(directory, "good"))
    bert().save_pretrained(os.path.join(directory, "fp"))
    query, fc2 = "encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"
    edits = {
        "a buffer the file lacks": lambda layers: layers[query].update(buffers=["input_scale"]),
        "another format": lambda layers: layers[fc2].update(config={"name": "W4A8", "group_size": None}),
        "another width": lambda layers: layers[fc2].update(in_features=32),
        "a layer left out": lambda layers: layers.pop("pooler.dense"),
        "a layer the model lacks": lambda layers: layers.update({"encoder.layer.9.output.dense": layers[fc2]}),
        "an unknown buffer": lambda layers: layers[query].update(buffers=["weight_offset"]),
        "an unknown config": lambda layers: layers[query].update(config={"name": "W2A2"}),
    }
    cases = []
    for name, edit in edits.items():
        path = os.path.join(directory, name.replace(" ", "_"))
        shutil.copytree(os.path.join(directory, "good"), path)
        config = json.loads(open(os.path.join(path, "config.json")).read())
        edit(config["quantization_config"]["layout"]["qla_kernels.quant_linears"])
        with open(os.path.join(path, "config.json"), "w") as handle:
            json.dump(config, handle)
        cases.append(Case("from_pretrained", name, lambda p=path: transformers.AutoModel.from_pretrained(p), True))
    cases.append(Case("from_pretrained", "load_pretrained of an fp model",
                      lambda: qk.load_pretrained(os.path.join(directory, "fp")), True))
    cases.append(Case("from_pretrained", "load_pretrained of a missing directory",
                      lambda: qk.load_pretrained(os.path.join(directory, "missing")), True))
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids)[0]
    cases.append(Case("from_pretrained", "round trip", lambda: qk.load_pretrained(os.path.join(directory, "good")),
                      False, check=lambda loaded: torch.equal(loaded(input_ids=ids)[0], expected)))
    return cases


def all_cases() -> List[Case]:
    return (config_cases() + quant_linear_cases() + quantize_cases() + op_cases() + checkpoint_cases() + lora_cases()
            + pretrained_cases())


def table(cases: List[Case]) -> Dict[str, Counter]:
    counts: Dict[str, Counter] = {}
    for case in cases:
        counts.setdefault(case.area, Counter())[outcome(case)] += 1
    return counts


def main() -> None:
    cases = all_cases()
    counts = table(cases)
    total = Counter()
    print(f"{'area':<20}" + "".join(f"{name:>22}" for name in OUTCOMES))
    for area, counter in counts.items():
        total.update(counter)
        print(f"{area:<20}" + "".join(f"{counter.get(name, 0):>22}" for name in OUTCOMES))
    print(f"{'all ' + str(len(cases)):<20}" + "".join(f"{total.get(name, 0):>22}" for name in OUTCOMES))


if __name__ == "__main__":
    main()
