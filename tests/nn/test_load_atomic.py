"""load_quantized is atomic and validates: a corrupted, foreign or mismatched file is a ValueError
naming what does not fit, and the skeleton is left exactly as it was (modules and tensors)."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import qla_kernels as qk
from qla_kernels.formats.checkpoint import read_checkpoint, write_checkpoint
from qla_kernels.methods import qwt

transformers = pytest.importorskip("transformers")


def _bert(intermediate=128, layers=2, labels=None):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=intermediate, vocab_size=100,
                                     **({} if labels is None else {"num_labels": labels}))
    cls = transformers.BertModel if labels is None else transformers.BertForSequenceClassification
    return cls(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A W8A8 BERT with static scales and QwT, saved: (path, its tensors, its metadata)."""
    fp = _bert()
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    batches = [{"input_ids": torch.randint(1, 100, (4, 12))} for _ in range(3)]
    qwt.calibrate(fp, model, batches, progress=False)
    model.encoder.layer[0].attention.self.query.set_static_activation(0.05, 3)
    path = str(tmp_path_factory.mktemp("ckpt") / "bert.safetensors")
    qk.save_quantized(model, path)
    tensors, metadata = read_checkpoint(path)
    return path, tensors, metadata


def _state(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    types, tensors = _state(model)
    assert types == before[0]
    assert tensors.keys() == before[1].keys() and all(torch.equal(tensors[k], before[1][k]) for k in tensors)


def _rewritten(tmp_path, tensors, metadata, name="bad.safetensors"):
    path = str(tmp_path / name)
    write_checkpoint(path, tensors, {k: v for k, v in metadata.items()})
    return path


def _corruptions(saved, tmp_path):
    path, tensors, metadata = saved
    layouts = metadata["qla_kernels.quant_linears"]
    first = next(iter(layouts))
    cases = {}
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (str(truncated), "not a readable safetensors file")
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign, metadata={"format": "pt"})
    cases["foreign metadata"] = (foreign, "not a qla_kernels checkpoint")
    relabelled = dict(tensors)
    relabelled[f"{first}.weight_scale"] = tensors[f"{first}.weight_scale"].view(torch.int32)
    cases["F32 scale relabelled I32"] = (_rewritten(tmp_path, relabelled, metadata, "i32.safetensors"),
                                         "weight_scale' is torch.int32, the model expects torch.float32")
    missing = {k: v for k, v in tensors.items() if k != f"{first}.weight_scale"}
    cases["tensor missing"] = (_rewritten(tmp_path, missing, metadata, "missing.safetensors"),
                               "lacks 'encoder.layer.0.attention.self.query.weight_scale'")
    huge = json.loads(json.dumps(metadata))
    huge["qla_kernels.quant_linears"][first]["in_features"] = 2 ** 42
    cases["in_features 2**42"] = (_rewritten(tmp_path, tensors, huge, "huge.safetensors"), "64×4398046511104 in the file")
    other_config = json.loads(json.dumps(metadata))
    other_config["qla_kernels.quant_linears"][first]["config"] = {"name": "W8A8", "group_size": 32}
    cases["config with unknown field"] = (_rewritten(tmp_path, tensors, other_config, "config.safetensors"),
                                          "W8A8 takes rotate; got group_size=")
    no_module = json.loads(json.dumps(metadata))
    no_module["qla_kernels.quant_linears"]["encoder.layer.7.output.dense"] = layouts[first]
    cases["module the skeleton lacks"] = (_rewritten(tmp_path, tensors, no_module, "nomodule.safetensors"),
                                          "no module 'encoder.layer.7.output.dense'")
    return cases


def test_corrupted_files_are_value_errors_and_leave_the_skeleton_unchanged(saved, tmp_path):
    for case, (path, message) in _corruptions(saved, tmp_path).items():
        skeleton = _bert()
        before = _state(skeleton)
        with pytest.raises(ValueError, match=message):
            qk.load_quantized(skeleton, path)
        _assert_unchanged(skeleton, before)


def test_an_alias_to_a_missing_tensor_is_a_value_error(saved, tmp_path):
    path, tensors, metadata = saved
    bad = str(tmp_path / "alias.safetensors")
    header = {k: json.dumps(v) for k, v in metadata.items()}
    header["qla.aliases"] = json.dumps({"pooler.dense.weight": "no.such.tensor"})
    save_file({k: v.contiguous() for k, v in tensors.items() if k != "pooler.dense.weight"}, bad, metadata=header)
    with pytest.raises(ValueError, match="must map names to stored tensors"):
        qk.load_quantized(_bert(), bad)


@pytest.mark.parametrize("skeleton", ["wider MLP", "deeper", "a classifier head"])
def test_a_skeleton_of_another_shape_is_refused_unchanged(saved, skeleton):
    model = {"wider MLP": lambda: _bert(intermediate=256), "deeper": lambda: _bert(layers=3),
             "a classifier head": lambda: _bert(labels=20)}[skeleton]()
    before = _state(model)
    with pytest.raises(ValueError):
        qk.load_quantized(model, saved[0])
    _assert_unchanged(model, before)


def test_a_meta_skeleton_is_refused(saved):
    with torch.device("meta"):
        skeleton = _bert()
    with pytest.raises(ValueError, match="meta device"):
        qk.load_quantized(skeleton, saved[0])


def test_a_valid_file_still_loads_bit_exactly(saved):
    path, tensors, _ = saved
    model = qk.load_quantized(_bert(), path)
    state = model.state_dict()
    assert all(torch.equal(state[key], tensors[key]) for key in tensors)


def test_a_classifier_head_of_another_class_count_is_refused(tmp_path):
    model = qk.quantize_(_bert(labels=10), qk.W8A8())
    path = str(tmp_path / "ten.safetensors")
    qk.save_quantized(model, path)
    skeleton = _bert(labels=20)
    before = _state(skeleton)
    with pytest.raises(ValueError, match=r"'classifier' is 20×64 \(out × in\) in the model, 10×64 in the file"):
        qk.load_quantized(skeleton, path)
    _assert_unchanged(skeleton, before)
