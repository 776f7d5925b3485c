"""A quantized model's forward keeps no per-call state on its modules (nn/forward_context.py), in
the calibration form and converted for runtime: calls from several threads equal sequential
calls bit for bit, a forward leaves every module's attributes as they were, and converted
models pickle and deep-copy.

The threads run with one intra-op thread each, so every op computes the same reductions in the
same order as the sequential call: any difference is state shared between calls."""

import copy
import io
import threading

import pytest
import torch

import qla_kernels as qk
from qla_kernels.methods import qwt
from qla_kernels.models.batches import model_output, run_model

from ..conftest import corrected_vit

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

THREADS, CALLS = 8, 8


def _vit_qla_qwt(fused: bool):
    """ViT-tiny W8A8 with a truncated QwT and QLA adapters (random weights), both lowered; its
    blocks fused (and converted: level two) or not (converted: level one)."""
    _, model, example = corrected_vit()
    return model, example if fused else None, lambda batch, seed: torch.randn(
        batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _bert_qwt():
    """BERT W8A8 with QwT on the pre-LN sums (hooks on the output norms)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    fp = transformers.AutoModel.from_config(config).eval()
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    batches = [{"input_ids": torch.randint(1, 100, (4, 12))} for _ in range(3)]
    qwt.calibrate(fp, model, batches, progress=False)
    return model, None, lambda batch, seed: {"input_ids": torch.randint(
        1, 100, (batch, 6 + seed % 7), generator=torch.Generator().manual_seed(seed))}


def _llama_fused():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    model = qk.quantize_(transformers.LlamaForCausalLM(config).eval(), qk.W8A8())
    return model, {"input_ids": torch.randint(0, 100, (2, 9))}, lambda batch, seed: {"input_ids": torch.randint(
        0, 100, (batch, 5 + seed % 6), generator=torch.Generator().manual_seed(seed)), "use_cache": False}


BUILDERS = {"vit_qla_qwt_lowered": lambda: _vit_qla_qwt(fused=False),
            "vit_qla_qwt_fused": lambda: _vit_qla_qwt(fused=True),
            "bert_qwt": _bert_qwt,
            "llama_fused": _llama_fused}


def _model(name: str, converted: bool):
    """(model, batch maker): fused with the builder's example (if any), then converted or not."""
    model, example, make_batch = BUILDERS[name]()
    if converted:
        qk.convert_for_runtime(model, example)
    elif example is not None:
        assert qk.fuse_blocks(model, example).fused
    return model, make_batch


FORMS = pytest.mark.parametrize("converted", [False, True], ids=["calibration", "converted"])


@pytest.fixture
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(model, batch):
    with torch.no_grad():
        return model_output(run_model(model, batch))


@FORMS
@pytest.mark.parametrize("name", list(BUILDERS))
def test_concurrent_calls_equal_sequential_calls(name, converted, one_intra_op_thread):
    model, make_batch = _model(name, converted)
    batches = [[make_batch(1 + (thread + call) % 4, thread * CALLS + call) for call in range(CALLS)]
               for thread in range(THREADS)]
    expected = [[_run(model, batch) for batch in per_thread] for per_thread in batches]
    results = [[None] * CALLS for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def work(thread):
        try:
            start.wait()
            for call, batch in enumerate(batches[thread]):
                results[thread][call] = _run(model, batch)
        except Exception as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)

    workers = [threading.Thread(target=work, args=(thread,)) for thread in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    differing = [(thread, call) for thread in range(THREADS) for call in range(CALLS)
                 if not torch.equal(results[thread][call], expected[thread][call])]
    assert not differing, f"{len(differing)} of {THREADS * CALLS} concurrent calls differ: {differing[:4]}"


def _state(model):
    """Every module's attributes, tensors and modules by identity, containers by content."""
    def frozen(value):
        if isinstance(value, (torch.Tensor, torch.nn.Module)):
            return ("id", id(value))
        if isinstance(value, dict):
            return tuple((key, frozen(item)) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return tuple(frozen(item) for item in value)
        return ("id", id(value)) if not isinstance(value, (int, float, str, bool, type(None))) else value

    return {name: frozen(vars(module)) for name, module in model.named_modules()}


@FORMS
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_forward_leaves_every_module_as_it_was(name, converted):
    model, make_batch = _model(name, converted)
    _run(model, make_batch(2, 0))  # first calls may fill caches keyed by input shape (window orders)
    before = _state(model)
    _run(model, make_batch(2, 0))
    assert _state(model) == before


@pytest.mark.parametrize("name", ["vit_qla_qwt_fused", "llama_fused"])
def test_converted_models_pickle_and_deep_copy(name):
    model, make_batch = _model(name, converted=True)
    batch = make_batch(2, 1)
    expected = _run(model, batch)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert type(restored) is type(model)
    assert torch.equal(_run(restored, batch), expected)
    assert torch.equal(_run(copy.deepcopy(model), batch), expected)
    # The restored plans read the restored layers' own tensors (an in-place load reaches them).
    assert all(layer.runtime_plan.weight.data is layer.weight
               for layer in restored.modules() if isinstance(layer, qk.QuantLinear))


def test_a_forward_scope_is_closed_whatever_raises():
    """A scope opened by hooks closes when the forward raises, and a pre-hook that raises before
    the scope opened does not close someone else's: the next call starts with no hand-offs."""
    from qla_kernels.nn import forward_context

    def raising(*args):
        raise KeyError("raised")

    for where in ("pre-hook before the scope", "forward", "forward hook"):
        module = torch.nn.Linear(2, 2)
        if where == "pre-hook before the scope":
            module.register_forward_pre_hook(raising)
            forward_context.scope_hooks(module)  # prepended: runs first, so it opens before the raise
            module._forward_pre_hooks.move_to_end(next(iter(module._forward_pre_hooks)), last=True)
        else:
            forward_context.scope_hooks(module)
            if where == "forward":
                module.forward = raising
            else:
                module.register_forward_hook(raising)
        forward_context.enter()  # an outer scope holding a hand-off that must survive the inner failure
        forward_context.put(module, "kept", 1)
        with pytest.raises(KeyError):
            module(torch.randn(1, 2))
        assert forward_context.peek(module, "kept") == 1, where
        forward_context.leave()
        assert forward_context.peek(module, "kept") is None, where
