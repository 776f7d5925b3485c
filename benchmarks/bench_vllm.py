"""vLLM serving throughput with the qla plugin, in the vLLM venv (`make test-vllm` builds it):

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--hidden 1024] [--layers 4] [--out benchmarks/results/...]

Builds a LLaMA-shaped model (random weights), saves it in floating point and quantized (qla, dynamic
per-token activations: W8A8, W4A8, W4A8 with QwT), and serves each with `vllm.LLM` in a
process of its own (eager, the model's dtype, one rank): the generation of `--batch` prompts x
`--new-tokens` tokens (ignore_eos), median of `--runs` after one warm-up. The variants:
vLLM's own fp model, qla W8A8, W4A8, W4A8 + QwT (full rank, in the down projections' epilogue:
the blocks QwT kept), and qla W8A8 under vLLM's multi-LoRA (`enable_lora`) without and with a
rank-16 adapter on all seven linears (vLLM's LoRA runs beside our GEMM). Writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qla_kernels.ops import cpu

ROOT = Path(__file__).resolve().parent.parent


def build(workdir: Path, hidden: int, layers: int) -> dict:
    import qla_kernels as qk
    from qla_kernels.methods import qwt
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 256,
                         max_position_embeddings=512, initializer_range=0.1)
    torch.manual_seed(0)
    fp = LlamaForCausalLM(config).eval()
    fp.save_pretrained(workdir / "fp")
    batches = [torch.randint(0, config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(i))
               for i in range(8)]
    for name, quant_config in (("w8a8", qk.W8A8()), ("w4a8", qk.W4A8())):
        plain = copy.deepcopy(fp)
        qk.quantize_(plain, quant_config)
        plain.save_pretrained(workdir / name)
    # QwT on W4A8: on this random model W8A8's error leaves QwT nothing it can fit on held-out tokens
    compensated = copy.deepcopy(fp)
    qk.quantize_(compensated, qk.W4A8())
    kept = sum(report.enabled for report in qwt.calibrate(fp, compensated, batches, progress=False))
    if not kept:
        raise SystemExit("QwT kept no block's compensation: the '+ QwT' row would measure plain W4A8")
    compensated.save_pretrained(workdir / "w4a8_qwt")
    write_lora(workdir / "lora", config, rank=16, b_scale=0.01, seed=1)
    return {"vocab": config.vocab_size, "hidden": hidden, "intermediate": config.intermediate_size, "layers": layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "qwt_blocks": kept}


def write_lora(path: Path, config, rank: int, b_scale: float, seed: int) -> Path:
    """A random PEFT LoRA (lora_alpha = 2·rank, B nonzero) on all seven linears of every layer of
    a LLaMA `config`, written as PEFT writes one (tests/integrations/test_vllm.py uses it too)."""
    from safetensors.torch import save_file

    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, (n, k) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, k, generator=generator) / k ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n, rank, generator=generator) * b_scale
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": sorted({name.split(".")[1] for name in shapes}), "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "base_model_name_or_path": None}))
    return path


def serve(args) -> None:
    """One variant in this process: prints {"seconds": [...]} as its last JSON line."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    options = {"enable_lora": True, "max_lora_rank": 16, "max_loras": 1} if args.enable_lora else {}
    llm = LLM(model=args.serve, quantization=args.quantization, skip_tokenizer_init=True, dtype=args.dtype,
              max_model_len=512, enforce_eager=True, **options)
    generator = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 8192, (32,), generator=generator).tolist()}
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    request = LoRARequest("adapter", 1, args.lora) if args.lora else None
    seconds = []
    for _ in range(args.runs + 1):
        start = time.perf_counter()
        llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds[1:]}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--quantization", help=argparse.SUPPRESS)
    parser.add_argument("--enable-lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    import vllm

    label = cpu.cpu_name().replace(" ", "_").replace("(R)", "")
    out = args.out or ROOT / "benchmarks" / "results" / f"vllm_{label}.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = build(work, args.hidden, args.layers)
        variants = {
            "vLLM fp (unquantized)": ["--serve", str(work / "fp")],
            "qla W8A8": ["--serve", str(work / "w8a8"), "--quantization", "qla"],
            "qla W4A8": ["--serve", str(work / "w4a8"), "--quantization", "qla"],
            "qla W4A8 + QwT (full rank)": ["--serve", str(work / "w4a8_qwt"), "--quantization", "qla"],
            "qla W8A8, enable_lora, no adapter": ["--serve", str(work / "w8a8"), "--quantization", "qla",
                                                  "--enable-lora"],
            "qla W8A8, enable_lora, rank-16 adapter": ["--serve", str(work / "w8a8"), "--quantization", "qla",
                                                       "--enable-lora", "--lora", str(work / "lora")],
        }
        rows = []
        common = ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--runs", str(args.runs),
                  "--dtype", args.dtype]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        for name, extra in variants.items():
            result = subprocess.run([sys.executable, __file__, *extra, *common], env=env, capture_output=True,
                                    text=True, timeout=900)
            if result.returncode != 0:
                raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
            seconds = json.loads(next(line for line in reversed(result.stdout.splitlines())
                                      if line.startswith('{"seconds"')))["seconds"]
            median = statistics.median(seconds)
            rows.append({"variant": name, "median_s": median, "seconds": seconds,
                         "tokens_per_s": args.batch * args.new_tokens / median})
            print(f"{name:42s} {median * 1e3:9.1f} ms  {rows[-1]['tokens_per_s']:8.1f} tok/s", flush=True)
    base = {row["variant"]: row["median_s"] for row in rows}
    for row in rows:
        row["speedup_vs_fp"] = base["vLLM fp (unquantized)"] / row["median_s"]
        row["time_vs_qla_w8a8"] = row["median_s"] / base["qla W8A8"]
    report = {"machine": cpu.cpu_name(), "isa": cpu.isa(), "cores": len(os.sched_getaffinity(0)),
              "torch": torch.__version__,
              "vllm": vllm.__version__, "dtype": args.dtype, "model": shape, "batch": args.batch,
              "prompt_tokens": 32, "new_tokens": args.new_tokens, "runs": args.runs, "mode": "eager, one rank",
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
