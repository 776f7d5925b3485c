"""PEFT task LoRAs on a quantized base, in the GEMM epilogue (integrations/peft.py, nn/task_lora.py)."""

import copy
import json

import pytest
import torch

import qla_kernels as qk
from tests.conftest import sqnr_db

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EPS = torch.finfo(torch.float32).eps


def _fp_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "gpt2":  # Conv1D layers ([in, out] weights; PEFT's fan_in_fan_out)
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval(), ["c_attn", "mlp.c_proj"]
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=100)
        return transformers.LlamaForCausalLM(config).eval(), ["q_proj", "v_proj", "down_proj"]
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=100)
    return transformers.BertModel(config).eval(), ["query", "value", "output.dense"]


def _peft_adapter(fp, targets, path, seed=1, **options):
    """A LoRA with random A and B (as if trained) on the fp model, saved as PEFT saves it."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **options})
    model = peft.get_peft_model(copy.deepcopy(fp), config).eval()
    model.save_pretrained(path)
    return model


def _peft_factors(peft_model):
    """{module name in the base model: (A, B, scaling)} read from the PEFT model itself."""
    factors = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            factors[name] = (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach(),
                             module.scaling["default"])
    return factors


def _layer_inputs(model, names, ids):
    inputs = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs.setdefault(name, args[0].detach())) for name in names]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return inputs


@pytest.mark.parametrize("runtime", [False, True], ids=["calibration form", "runtime form"])
@pytest.mark.parametrize("kind, options", [
    ("llama", {"rank_pattern": {"down_proj": 2}, "lora_alpha": 16}),
    ("bert", {"use_rslora": True, "alpha_pattern": {"value": 3}}),
    ("gpt2", {"fan_in_fan_out": True, "rank_pattern": {"c_attn": 8}}),
], ids=["llama rank pattern", "bert rsLoRA alpha pattern", "gpt2 Conv1D"])
def test_each_layer_adds_the_adapter_computed_separately(tmp_path, kind, options, runtime):
    fp, targets = _fp_model(kind)
    peft_model = _peft_adapter(fp, targets, tmp_path, **options)
    factors = _peft_factors(peft_model)
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    if runtime:
        qk.convert_for_runtime(model)
    assert sorted(qk.load_lora(model, str(tmp_path), name="task")) == sorted(factors)
    ids = torch.randint(0, 100, (2, 7))
    for name, x in _layer_inputs(model, factors, ids).items():
        layer = model.get_submodule(name)
        down, up, scaling = factors[name]
        assert layer.task_loras["task"].rank == down.shape[0] and (runtime == ("task" in layer.lora_plans))
        with torch.no_grad():
            y = layer(x)
            qk.set_lora(model, None)
            base = layer(x)
            qk.set_lora(model, "task")
        t = x.reshape(-1, x.shape[-1]) @ down.t()
        separate = base.reshape(t.shape[0], -1) + (t @ up.t()) * scaling
        # fp32: T·Uᵀ (r terms) and the scaling in another order, then one rounding into the sum.
        bound = 4 * (down.shape[0] + 2) * EPS * ((t.abs() @ up.abs().t()) * scaling + base.abs().reshape(t.shape[0], -1))
        assert ((y.reshape(t.shape[0], -1) - separate).abs() <= bound).all(), name


@pytest.mark.parametrize("seed", [0, 1])
def test_an_adapter_trained_on_the_fp_model_moves_the_quantized_model_as_it_moves_the_fp_one(tmp_path, seed):
    fp, targets = _fp_model("llama", seed)
    peft_model = _peft_adapter(fp, targets, tmp_path, seed=seed + 1)
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        base, fp_base, fp_adapted = model(ids).logits, fp(ids).logits, peft_model(ids).logits
        qk.load_lora(model, str(tmp_path))
        adapted = model(ids).logits
    assert sqnr_db(fp_adapted, adapted) > 25  # W8A8 of this model: about as close as without the adapter
    assert torch.nn.functional.cosine_similarity((adapted - base).flatten(), (fp_adapted - fp_base).flatten(), 0) > 0.99


def test_adapters_switch_and_unload_without_touching_the_base(tmp_path):
    fp, targets = _fp_model("llama")
    _peft_adapter(fp, targets, tmp_path / "a", seed=1)
    _peft_adapter(fp, targets[:1], tmp_path / "b", seed=2)
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    qk.convert_for_runtime(model)
    ids = torch.randint(0, 100, (2, 7))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    run = lambda: model(ids).logits  # noqa: E731
    with torch.no_grad():
        base = run()
        qk.load_lora(model, str(tmp_path / "a"), name="a")
        only_a = run()
        qk.load_lora(model, str(tmp_path / "b"), name="b")  # loading activates it
        only_b = run()
        assert not torch.equal(only_a, base) and not torch.equal(only_b, only_a)
        qk.set_lora(model, "a")
        assert torch.equal(run(), only_a)
        qk.set_lora(model, None)
        assert torch.equal(run(), base)
        qk.unload_lora(model, "a")
        qk.set_lora(model, "b")
        assert torch.equal(run(), only_b)
        twin = copy.deepcopy(model)  # its own adapters and plans
        qk.unload_lora(model, "b")
        assert torch.equal(run(), base) and torch.equal(twin(ids).logits, only_b)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    with pytest.raises(ValueError, match="no adapter 'a' is loaded"):
        qk.set_lora(model, "a")


def test_a_state_dict_loads_like_the_directory_and_moves_with_the_model(tmp_path):
    fp, targets = _fp_model("bert")
    peft_model = _peft_adapter(fp, targets, tmp_path)
    state = peft.get_peft_model_state_dict(peft_model)
    from_directory = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    from_state = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    qk.load_lora(from_directory, str(tmp_path))
    qk.load_lora(from_state, state, config=peft_model.peft_config["default"])
    named = {key: value for key, value in peft_model.state_dict().items() if "lora_" in key}  # "lora_A.default"
    qk.load_lora(from_state, named, name="named", config=peft_model.peft_config["default"].to_dict())
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = from_directory(input_ids=ids)[0]
        assert torch.equal(from_state(input_ids=ids)[0], expected)
        qk.set_lora(from_state, "default")
        assert torch.equal(from_state(input_ids=ids)[0], expected)
        half = from_state.half()
        assert half.encoder.layer[0].attention.self.query.task_loras["default"].up.dtype == torch.float16
        assert sqnr_db(expected, half(input_ids=ids)[0].float()) > 30


def _saved_adapter(tmp_path, fp, targets, edit):
    _peft_adapter(fp, targets, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    edit(config)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda config: config.update(use_dora=True), "DoRA"),
    (lambda config: config.update(bias="all"), "LoRA biases"),
    (lambda config: config.update(modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda config: config.update(r=8), "the config gives r=8, its tensors rank 4"),
    (lambda config: config.update(peft_type="IA3"), "only LoRA adapters"),
    (lambda config: config.update(alora_invocation_tokens=[5, 6]), "is a variant \\(alora_invocation_tokens\\)"),
    (lambda config: config.update(init_lora_weights="pissa_niter_4"), "changed the base weights"),
    (lambda config: config.update(lora_alpha=None), "lora_alpha must be a number"),
    (lambda config: config.update(rank_pattern={"q_proj(": 2}), "is not a regular expression"),
], ids=["dora", "bias", "modules_to_save", "rank", "type", "alora", "pissa", "alpha null", "bad pattern"])
def test_adapters_that_cannot_run_on_the_quantized_gemms_are_value_errors(tmp_path, edit, message):
    fp, targets = _fp_model("llama")
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    with pytest.raises(ValueError, match=message):
        qk.load_lora(model, _saved_adapter(tmp_path, fp, targets, edit))
    assert not any(module.task_loras for module in model.modules() if isinstance(module, qk.QuantLinear))


def test_targets_that_are_not_quantized_or_are_fused_are_value_errors(tmp_path):
    fp, targets = _fp_model("llama")
    _peft_adapter(fp, targets, tmp_path)
    partly = qk.quantize_(copy.deepcopy(fp), qk.W8A8(), filter_fn=lambda module, name: "v_proj" not in name)
    with pytest.raises(ValueError, match="v_proj' is a Linear, not a QuantLinear"):
        qk.load_lora(partly, str(tmp_path))
    assert not any(module.task_loras for module in partly.modules() if isinstance(module, qk.QuantLinear))
    fused = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    qk.convert_for_runtime(fused, {"input_ids": torch.randint(0, 100, (1, 8))})
    with pytest.raises(ValueError, match="is part of a fused block"):
        qk.load_lora(fused, str(tmp_path))
    adapted = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    qk.load_lora(adapted, str(tmp_path))
    with pytest.raises(ValueError, match="carries task LoRAs, which fused blocks do not run"):
        qk.fuse_blocks(adapted, {"input_ids": torch.randint(0, 100, (1, 8))})
    with pytest.raises(ValueError, match="is already loaded"):
        qk.load_lora(adapted, str(tmp_path))
    with pytest.raises(ValueError, match="needs its config"):
        qk.load_lora(adapted, {"x.lora_A.weight": torch.zeros(1, 1)}, name="other")
    with pytest.raises(ValueError, match="is not a PEFT adapter directory"):
        qk.load_lora(adapted, str(tmp_path / "missing"), name="other")
