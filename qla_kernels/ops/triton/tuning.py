"""Kernel configurations per GPU generation and a capture-safe autotuner.

sm_90 configurations are wgmma-eligible (BLOCK_M a multiple of 64, num_warps a multiple of 4,
int8 BLOCK_K >= 32); sm_80 ones add small-M tiles for decode-sized batches. The tuner times each
candidate once per shape bucket (M rounded up to a power of two, N, K and the kernel's flags) and
caches the winner. It never benchmarks while a CUDA graph is being captured: a bucket first met
during capture runs the default (first) configuration, with a warning, and is not cached.
QLA_AUTOTUNE=0 always uses the default; under TRITON_INTERPRET=1 the one interpreter
configuration runs.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Dict, Hashable, Sequence, Tuple

import torch

from ..dispatch import interpreting


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> Dict[str, int]:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)


# Every configuration keeps <= 64 fp32 accumulator values per thread (BLOCK_M·BLOCK_N / (32·num_warps)):
# with more, the full epilogue (low-rank dot, GELU, bias, residual) spills on sm_90 (ptxas -v, checked
# by tests/ops/test_triton_aot.py). 128×256 tiles come back once the epilogue is sub-tiled.
SM90_GEMM_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (128, 128, 128, 8, 8, 3),
    (64, 256, 128, 8, 8, 3),
    (64, 128, 128, 8, 4, 4),
    (128, 64, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
))
SM80_GEMM_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (128, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
    (32, 64, 128, 8, 4, 4),
    (16, 64, 128, 8, 4, 4),
))
INTERPRETER_GEMM_CONFIG = GemmConfig(16, 32, 32, 2, 4, 1)


def gemm_candidates(device: torch.device) -> Sequence[GemmConfig]:
    if interpreting() or device.type != "cuda":
        return (INTERPRETER_GEMM_CONFIG,)
    major, _ = torch.cuda.get_device_capability(device)
    return SM90_GEMM_CONFIGS if major >= 9 else SM80_GEMM_CONFIGS


def m_bucket(m: int) -> int:
    return 1 << max(4, (max(m, 1) - 1).bit_length())


class Autotuner:
    """Picks, per key, the fastest candidate by timing `launch(config)` with triton.testing.do_bench."""

    def __init__(self, name: str):
        self.name = name
        self.best: Dict[Hashable, GemmConfig] = {}
        self._warned = False

    def select(self, key: Hashable, candidates: Sequence[GemmConfig], launch: Callable[[GemmConfig], None]) -> GemmConfig:
        if len(candidates) == 1 or os.environ.get("QLA_AUTOTUNE") == "0":
            return candidates[0]
        if key in self.best:
            return self.best[key]
        if torch.cuda.is_current_stream_capturing():
            if not self._warned:
                warnings.warn(f"{self.name}: shape {key} met first inside CUDA-graph capture; using the default "
                              "configuration. Run the model once before capturing to tune it.")
                self._warned = True
            return candidates[0]
        from triton.testing import do_bench

        timings = {}
        for config in candidates:
            try:
                timings[config] = do_bench(lambda: launch(config), warmup=5, rep=25)
            except Exception as error:  # a configuration this GPU cannot run (shared memory, registers)
                if "OutOfResources" not in type(error).__name__ and "out of resource" not in str(error):
                    raise
        if not timings:
            raise RuntimeError(f"{self.name}: no configuration runs for {key}")
        self.best[key] = min(timings, key=timings.get)
        return self.best[key]
