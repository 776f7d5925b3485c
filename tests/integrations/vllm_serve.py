"""Greedy decoding of a saved model with vLLM in a process of its own (vLLM starts its engine in
child processes, hence a script with a main guard), for tests/integrations/test_vllm.py. It prints
one line of JSON (vLLM's own log lines may follow): {"tokens": per prompt the greedy tokens, "logprobs": per prompt the log-probability
of each, "methods": per rank {layer: its quantization method's class}}."""

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--quantization", default="qla")
    parser.add_argument("--compile", action="store_true", help="vLLM's default torch.compile (else eager)")
    parser.add_argument("--lora", help="a PEFT LoRA directory, served by vLLM's multi-LoRA (enable_lora)")
    args = parser.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model sends a function to the workers
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=args.model, quantization=args.quantization or None, skip_tokenizer_init=True, dtype="float32",
              max_model_len=128, enforce_eager=not args.compile, tensor_parallel_size=args.tensor_parallel,
              **({"enable_lora": True, "max_lora_rank": 16, "max_loras": 1} if args.lora else {}))
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in json.loads(args.prompts)],
                           SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=0, detokenize=False),
                           lora_request=LoRARequest("adapter", 1, args.lora) if args.lora else None)
    from qla_kernels.integrations.vllm import layer_methods

    methods = llm.apply_model(layer_methods)  # one per rank
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    logprobs = [[step[token].logprob for step, token in zip(output.outputs[0].logprobs, ids)]
                for output, ids in zip(outputs, tokens)]
    print(json.dumps({"tokens": tokens, "logprobs": logprobs, "methods": methods}))



if __name__ == "__main__":
    main()
