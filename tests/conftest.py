import os

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is read when a
# kernel is defined, so it must be set before qla_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test-portable` runs the floating-point-sensitive tests once more without oneDNN.
if os.environ.get("QLA_TEST_MKLDNN") == "0":
    torch.backends.mkldnn.enabled = False

# Property tests: no deadline (the first call compiles/warms up); CI keeps them small, the GPU
# machine widens them with HYPOTHESIS_PROFILE=wide.
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("wide", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
WIDEN = 4 if os.environ.get("HYPOTHESIS_PROFILE") == "wide" else 1


def examples(count: int) -> settings:
    """Settings for a property test sized for CI at `count` examples, widened by the profile."""
    return settings(max_examples=count * WIDEN, deadline=None)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(requires_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's measure of quantized-vs-fp quality)."""
    reference, approximation = reference.detach().double(), approximation.detach().double()
    noise = (reference - approximation).square().mean()
    return float(10 * torch.log10(reference.square().mean() / noise.clamp_min(1e-30)))


# Two correct runs of one quantized model through different floating-point code (another kernel
# library, Inductor, a fused norm, another summation order) agree to ulps until per-token dynamic
# quantization re-rounds a row: an ulp moves a value across a rounding edge, or a row's absmax and
# with it every code of the row. A re-rounded code is off by one step s, while the quantization
# error itself has variance s²/12 per code: if a fraction f of the codes re-round, the difference
# between the runs carries 12·f of the quantization error's energy. 20 dB below it holds while
# f < 1/1200 (ulp-sized perturbations re-round about 1e-4 of the codes); a wrong computation
# (a swapped operand, a missed term) is as large as the quantization error or larger.
REROUNDING_MARGIN_DB = 20.0


def assert_same_up_to_rerounding(fp_reference: torch.Tensor, expected: torch.Tensor, actual: torch.Tensor) -> None:
    """`actual` equals `expected` (both quantized) up to re-rounded codes: their difference is
    REROUNDING_MARGIN_DB below `expected`'s quantization error against `fp_reference`."""
    quantization = sqnr_db(fp_reference, expected)
    agreement = sqnr_db(expected, actual)
    assert agreement >= quantization + REROUNDING_MARGIN_DB, (
        f"the two runs differ by {agreement:.1f} dB SQNR, the quantization error is {quantization:.1f} dB")


@pytest.fixture(scope="session")
def digits_vit():
    """The first of three 4-block ViTs trained on scikit-learn's digits (tests/digits.py; the
    weights ship in tests/data, so every machine tests the same model)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    from .digits import digits_vit as load

    return load(0)


@pytest.fixture(scope="session")
def digits_vits():
    """All three digits ViTs (seeds 0, 1, 2): claims about methods are asserted on their mean."""
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    from .digits import SEEDS, digits_vit as load

    return [load(seed) for seed in SEEDS]


@pytest.fixture(scope="session")
def digits_cnns():
    """Three small ResNets trained on the digits (seeds 0, 1, 2; tests/digits.py)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torchvision")
    from .digits import SEEDS, digits_vit as load

    return [load(seed, "cnn") for seed in SEEDS]


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference ‖ model) over the batch."""
    p = torch.log_softmax(reference_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(dim=-1).mean())


def decoder_config(kind: str):
    """A tiny random-weight decoder's transformers config (width 64, 2 layers) by family."""
    import transformers

    return {
        "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                                bos_token_id=0, eos_token_id=0),
        "llama": lambda: transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=128, vocab_size=100),
        "opt": lambda: transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                              vocab_size=100, word_embed_proj_dim=64),
        "gemma": lambda: transformers.GemmaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                                  vocab_size=100),
        "phi3": lambda: transformers.Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }[kind]()


def tiny_bert(batch_count: int):
    """(a seeded random-weight BERT: 2 layers of width 48, `batch_count` batches of 4 × 12 token ids)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                     vocab_size=100)
    model = transformers.BertModel(config).eval()
    return model, [{"input_ids": torch.randint(0, 100, (4, 12))} for _ in range(batch_count)]


def randomize_adapters(model: torch.nn.Module) -> None:
    """Trained-looking QLA adapters (fresh ones are zero and would hide a wrong lowering)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qla_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05 + (0.7 if name.endswith("gate") else 0))


def corrected_vit(depth: int = 2):
    """(fp ViT-tiny at 32², its W8A8 quantization with a truncated QwT and QLA adapters of random
    weights, both lowered onto the GEMMs, an example batch): every correction the GEMMs carry."""
    import copy

    import timm

    import qla_kernels as qk
    from qla_kernels.methods import qla, qwt

    torch.manual_seed(0)
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth).eval()
    model = qk.quantize_(copy.deepcopy(fp), qk.W8A8())
    qwt.calibrate(fp, model, [torch.randn(4, 3, 32, 32) for _ in range(3)], progress=False)
    qwt.truncate(model, energy=0.9)
    example = torch.randn(2, 3, 32, 32)
    qla.add_adapters(model, rank=4, example=example)
    randomize_adapters(model)
    qla.fuse(model)
    qwt.lower(model, example)
    return fp, model, example


def first_call(model: torch.nn.Module, module: torch.nn.Module, batch: dict):
    """(args, kwargs) of `module`'s first call when `model` runs on `batch` (no KV cache)."""
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        handle.remove()
    return calls[0]
