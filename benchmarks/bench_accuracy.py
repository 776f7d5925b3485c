"""Accuracy at 4 bits on the real all-MiniLM-L6-v2, stage by stage, on the shipped corpus.

    python benchmarks/bench_accuracy.py [--calib 512] [--seeds 0 1 2] [--choose-qla]

Each seed draws `--calib` sentences from the corpus' calibration split (batches of 32). Per config
(W4A8 per channel, W4A4) the pipeline's stages run in order (rotation → GPTQ → QwT → QLA), each
on the model of the stage before, and after every stage the mean embedding cosine vs fp32 is
measured on the whole test split (900 sentences, on the `cpu` backend where it is built). GPLQ runs
beside it at W4A4 in its thesis form (static LSQ+ activations) and in this project's default
(per-token dynamic activations, rotated). Nothing is chosen on the test split: QLA's epochs and
learning rate (workflow.QLAOptions) were chosen with `--choose-qla`, which trains the W4A4
rotation + GPTQ + QwT model's adapters over a grid and scores each on the validation split.
Writes benchmarks/results/accuracy_minilm_<cpu>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

import qla_kernels as qk
from qla_kernels.apps import workflow
from qla_kernels.apps.sentence_embedding import corpus, load_minilm
from qla_kernels.methods import gplq, gptq, qla, qwt
from qla_kernels.ops import cpu as cpu_kernels

BATCH = 32
QLA_GRID = ((2, 3e-3), (4, 3e-3), (4, 1e-2), (8, 1e-3))


def batches(tokenizer, sentences: List[str]) -> List[dict]:
    return [dict(tokenizer(sentences[i:i + BATCH], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), BATCH)]


def cosine(fp, model, data) -> float:
    return workflow.evaluate(fp, model, data)["cosine"]


def adapted(model, fp, calibration, epochs: int, lr: float, seed: int):
    model = copy.deepcopy(model)
    qla.add_adapters(model, rank=workflow.QLAOptions.rank, example=calibration[0], seed=seed)
    qla.train(model, fp, calibration, epochs=epochs, lr=lr, seed=seed, progress=False)
    return model


def pipeline(fp, tokenizer, calibration, test, seed: int, log) -> Dict[str, Dict[str, float]]:
    options = workflow.QLAOptions()
    results: Dict[str, Dict[str, float]] = {}
    for name, config, rotated in (("W4A8", qk.W4A8(), qk.W4A8(rotate="hadamard")),
                                  ("W4A4", qk.W4A4(), qk.W4A4(rotate="hadamard"))):
        row: Dict[str, float] = {}

        def measure(stage, model):
            row[stage] = cosine(fp, model, test)
            log(f"seed {seed} {name} {stage}: {row[stage]:.4f}")

        measure("ptq", qk.quantize_(copy.deepcopy(fp), config))
        model = gptq.quantize(copy.deepcopy(fp), config, calibration, progress=False)
        measure("gptq", model)
        qwt.calibrate(fp, model, calibration, progress=False)
        measure("gptq+qwt", model)
        measure("rotation", qk.quantize_(copy.deepcopy(fp), rotated))
        model = gptq.quantize(copy.deepcopy(fp), rotated, calibration, progress=False)
        measure("rotation+gptq", model)
        qwt.calibrate(fp, model, calibration, progress=False)
        measure("rotation+gptq+qwt", model)
        if name == "W4A4":
            measure("rotation+gptq+qwt+qla", adapted(model, fp, calibration, options.epochs, options.lr, seed))
            measure("ptq+qla", adapted(qk.quantize_(copy.deepcopy(fp), config), fp, calibration, options.epochs,
                                       options.lr, seed))
            for activations, gplq_config in (("static", config), ("dynamic", rotated)):
                student, _ = gplq.activation_qat(fp, gplq_config, calibration, activations=activations, progress=False)
                model, _ = gplq.weight_ptq(student, fp, gplq_config, calibration, compensate=False, progress=False)
                measure(f"gplq_{activations}", model)
                qwt.calibrate(fp, model, calibration, progress=False)
                measure(f"gplq_{activations}+qwt", model)
        results[name] = row
    return results


def choose_qla(fp, calibration, validation, log) -> Dict[str, float]:
    model = gptq.quantize(copy.deepcopy(fp), qk.W4A4(rotate="hadamard"), calibration, progress=False)
    qwt.calibrate(fp, model, calibration, progress=False)
    scores = {"none": cosine(fp, model, validation)}
    log(f"validation, W4A4 rotation+gptq+qwt: {scores['none']:.4f}")
    for epochs, lr in QLA_GRID:
        key = f"epochs={epochs},lr={lr:g}"
        scores[key] = cosine(fp, adapted(model, fp, calibration, epochs, lr, 0), validation)
        log(f"validation, + QLA {key}: {scores[key]:.4f}")
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--choose-qla", action="store_true", help="score QLA's grid on the validation split")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    pool = corpus("calibration")
    if not 0 < args.calib <= len(pool):
        raise ValueError(f"--calib must be in [1, {len(pool)}], got {args.calib}")
    fp, tokenizer = load_minilm()
    test, validation = batches(tokenizer, corpus("test")), batches(tokenizer, corpus("validation"))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    kernels = qk.backends()["cpu"]
    report = {"model": "all-MiniLM-L6-v2", "cpu": cpu_kernels.cpu_name(),
              "backend": f"cpu, {cpu_kernels.describe()}" if kernels.available else f"reference ({kernels.reason})",
              "threads": torch.get_num_threads(), "calibration_sentences": args.calib,
              "test_sentences": len(corpus("test")), "qla": vars(workflow.QLAOptions()), "seeds": {}}
    start = time.perf_counter()
    for seed in args.seeds:
        calibration = batches(tokenizer, random.Random(seed).sample(pool, args.calib))
        if args.choose_qla:
            report["seeds"][seed] = {"qla_validation": choose_qla(fp, calibration, validation, log)}
        else:
            report["seeds"][seed] = pipeline(fp, tokenizer, calibration, test, seed, log)
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "accuracy_minilm_qla_choice" if args.choose_qla else "accuracy_minilm"
    path = out / f"{name}_{cpu_kernels.cpu_name().replace(' ', '_')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
