"""Task-LoRA switching on LLaMA-3-8B-shaped layers (random weights), in this process.

    python benchmarks/bench_lora_switch.py [--layers 32] [--rank 16] [--config w4a16] [--out benchmarks/results/...]

Builds a LLaMA decoder with 8B shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads; a small
vocabulary: the embedding plays no part in switching) directly in quantized form on the meta
device, materializes it with random codes and scales, converts it for runtime, loads two PEFT
LoRA adapters of `--rank` on all seven linears of every layer, and times:
- `load_lora` (each adapter's plans are built when it is loaded),
- `set_lora` between the two adapters and back to the base (median of 101 switches),
- one decode token (M = 1) through the first decoder layer with the base and with an adapter
  (median of 21): the adapter's cost in the epilogue.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qla_kernels as qk
from qla_kernels.apps.benchmark import cpu_timer
from qla_kernels.ops import cpu

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
CONFIGS = {"w4a16": lambda: qk.W4A16(group_size=128), "w8a8": qk.W8A8, "w4a8": qk.W4A8}


def quantized_llama(layers: int, config):
    import transformers

    shape = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8, num_hidden_layers=layers, vocab_size=1024)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(shape).eval()
        qk.quantize_(model, config, filter_fn=lambda module, name: name != "lm_head")
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype in (torch.int8, torch.uint8):
                tensor.copy_(torch.randint(0, 16, tensor.shape, generator=generator, dtype=torch.uint8).to(tensor.dtype))
            elif tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.02 + (1.0 if "norm" in name else 0.0))
    qk.convert_for_runtime(model)
    return model


def adapter(layers: int, rank: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sizes = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
             "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
    tensors = {}
    for layer in range(layers):
        for linear in LINEARS:
            k, n = sizes[linear.rpartition(".")[2]]
            key = f"base_model.model.model.layers.{layer}.{linear}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, k, generator=generator) / k ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n, rank, generator=generator) * 0.01
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--config", default="w4a16", choices=sorted(CONFIGS))
    parser.add_argument("--out")
    args = parser.parse_args()
    start = time.perf_counter()
    model = quantized_llama(args.layers, CONFIGS[args.config]())
    build_s = time.perf_counter() - start
    lora_config = {"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank}
    load_ms = []
    for name, seed in (("a", 1), ("b", 2)):
        tensors = adapter(args.layers, args.rank, seed)
        start = time.perf_counter()
        qk.load_lora(model, tensors, name=name, config=lora_config)
        load_ms.append((time.perf_counter() - start) * 1e3)
    targets = ["a", "b", None]
    state = {"index": 0}

    def switch():
        state["index"] += 1
        qk.set_lora(model, targets[state["index"] % 3])

    switch_ms = cpu_timer(switch, 101)
    layer = model.model.layers[0]
    hidden = torch.randn(1, 1, 4096)
    position = torch.zeros(1, 1, dtype=torch.long)
    embeddings = model.model.rotary_emb(hidden, position)

    def decode():
        with torch.no_grad():
            layer(hidden, position_embeddings=embeddings, position_ids=position)

    decode_ms = {}
    for name in (None, "a"):
        qk.set_lora(model, name)
        decode_ms["base" if name is None else "with adapter"] = cpu_timer(decode, 21)
    report = {
        "machine": cpu.cpu_name(), "path": cpu.describe(), "threads": torch.get_num_threads(),
        "config": args.config, "layers": args.layers, "rank": args.rank, "linears_with_adapter": args.layers * 7,
        "build_and_convert_s": round(build_s, 2), "load_lora_ms": [round(ms, 1) for ms in load_ms],
        "set_lora_ms_median": round(switch_ms, 4), "decode_layer0_m1_ms": {k: round(v, 3) for k, v in decode_ms.items()},
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
