"""GEMM configurations per GPU generation and the autotuner.

sm_90 configurations are wgmma-eligible (BLOCK_M a multiple of 64, num_warps a multiple of 4,
int8 BLOCK_K >= 32); sm_80 ones add small-M tiles for decode-sized batches. fp32 operands (a
model run in fp32) get their own, smaller tiles: the large ones spill (ptxas -v).

The tuner times each candidate once per key (M bucket, N, K, the kernel's flags and operand
dtypes) and caches the winner in memory and on disk (`QLA_TUNING_CACHE`, default
~/.cache/qla_kernels; one file per GPU name and Triton version), so a second process does not tune
again. A candidate this GPU cannot run (OutOfResources: shared memory, registers) is skipped on
every path. Without timing (QLA_AUTOTUNE=0, or a key first met inside CUDA-graph capture, where
benchmarking is impossible) the first candidate that runs is used; a capture-time choice is not
cached, so the first call outside capture tunes. Under TRITON_INTERPRET=1 one interpreter
configuration per width runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, Hashable, Sequence, Tuple

import torch

from .kernel_launch import Target, is_planning


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
# (128×64 at 4 warps spilled with int4 group scales and row maps, ptxas -v.)
SM80_GEMM_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (128, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
    (32, 64, 128, 8, 4, 4),
    (16, 64, 128, 8, 4, 4),
))
# W4A16 on sm_80: 64-wide K steps (a 128-wide step's dequantized tile spilled at 64×64, ptxas -v).
SM80_W4A16_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (128, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
    (32, 64, 64, 8, 4, 4),
    (16, 64, 64, 8, 4, 4),
))
# fp32 operands (a model run in fp32): the dots take them as tf32x3 (three tf32 products, fp32
# accuracy), which needs about three times the registers of an fp16 dot. With an fp32 main loop
# (W4A16 on fp32 activations) 32-wide K steps; with an fp32 low-rank / full-rank segment after an
# integer main loop, smaller tiles. Each list is the tiles that compiled without spills for every
# launch of the table (ptxas -v).
SM90_FP32_MAIN_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (64, 128, 32, 8, 8, 3),
    (128, 64, 32, 8, 4, 3),
    (64, 64, 32, 8, 4, 3),
))
SM80_FP32_MAIN_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (64, 64, 32, 8, 8, 3),
    (32, 64, 32, 8, 8, 3),
    (16, 64, 32, 8, 4, 3),
))
SM90_FP32_EPILOGUE_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (128, 128, 128, 8, 8, 3),
    (64, 128, 128, 8, 8, 3),
    (128, 64, 128, 8, 8, 3),
    (64, 64, 128, 8, 4, 4),
))
SM80_FP32_EPILOGUE_CONFIGS: Tuple[GemmConfig, ...] = tuple(GemmConfig(*c) for c in (
    (32, 64, 128, 8, 4, 4),
    (16, 64, 128, 8, 4, 4),
))
# The interpreter runs each program's ops in Python, so its cost is per program and op, hardly per
# element: layers of model width (>= 256 outputs) run a larger tile (a ViT-tiny block took half
# the time), narrower ones the small tile whose edges the unit tests' ragged shapes cross.
INTERPRETER_GEMM_CONFIG = GemmConfig(16, 32, 32, 2, 4, 1)
INTERPRETER_WIDE_GEMM_CONFIG = GemmConfig(32, 64, 64, 2, 4, 1)
INTERPRETER_WIDE_COLUMNS = 256


def gemm_candidates(target: Target, w4a16: bool = False, fp32_main: bool = False,
                    fp32_epilogue: bool = False, columns: int = 0) -> Sequence[GemmConfig]:
    """The configurations the GEMM may run with on `target`, the default first. `w4a16`: the
    main loop dequantizes uint4 weights; `fp32_main`: its dots take fp32 operands (W4A16 with
    fp32 activations); `fp32_epilogue`: a low-rank or full-rank segment does; `columns`: the
    weight's rows N (the interpreter's tile depends on it)."""
    if target.interpreter:
        return (INTERPRETER_WIDE_GEMM_CONFIG if columns >= INTERPRETER_WIDE_COLUMNS else INTERPRETER_GEMM_CONFIG,)
    hopper = target.capability[0] >= 9
    if fp32_main:
        return SM90_FP32_MAIN_CONFIGS if hopper else SM80_FP32_MAIN_CONFIGS
    if fp32_epilogue:
        return SM90_FP32_EPILOGUE_CONFIGS if hopper else SM80_FP32_EPILOGUE_CONFIGS
    if hopper:
        return SM90_GEMM_CONFIGS
    return SM80_W4A16_CONFIGS if w4a16 else SM80_GEMM_CONFIGS


def conv_candidates(target: Target, fp32_epilogue: bool = False, columns: int = 0,
                    quantize_in_loop: bool = False) -> Sequence[GemmConfig]:
    """The implicit-GEMM convolution's configurations: the GEMM's without the tiles that spilled
    with the window addressing (ptxas -v, ResNet-50 and DETR launches): 128×64 and 64×128 at 4
    warps (4–108 B, sm_90 and sm_80); with an fp32 full-rank segment 128×128 on sm_90 (120–276 B)
    and, quantizing in the loop, 32×64 on sm_80 (8 B)."""
    def spills(config: GemmConfig) -> bool:
        tile = config.block_m * config.block_n
        if config.num_warps == 4 and tile == 8192:
            return True
        if fp32_epilogue and target.capability[0] >= 9:
            return tile == 16384
        return fp32_epilogue and quantize_in_loop and tile == 2048
    candidates = gemm_candidates(target, fp32_epilogue=fp32_epilogue, columns=columns)
    return candidates if target.interpreter else tuple(config for config in candidates if not spills(config))


def m_bucket(m: int) -> int:
    return 1 << max(4, (max(m, 1) - 1).bit_length())


def _is_out_of_resources(error: Exception) -> bool:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - every supported Triton has it
        return "OutOfResources" in type(error).__name__
    return isinstance(error, OutOfResources)


def tuning_cache_dir() -> Path:
    return Path(os.environ.get("QLA_TUNING_CACHE") or Path.home() / ".cache" / "qla_kernels")


def _cache_file(target: Target) -> Path:
    import triton

    gpu = re.sub(r"[^A-Za-z0-9]+", "_", target.name).strip("_")
    return tuning_cache_dir() / f"tuning-{gpu}-triton-{triton.__version__}.json"


class Autotuner:
    """Runs, per key, the fastest candidate that this GPU can run (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self.best: Dict[Tuple[str, str], GemmConfig] = {}  # (GPU name, key) -> tuned choice
        self._untuned: Dict[Tuple[str, str], GemmConfig] = {}  # first candidate that runs, untimed
        self._loaded: set = set()
        self._lock = threading.Lock()
        self._warned_capture = False
        self._warned_disk = False

    def run(self, key: Hashable, target: Target, candidates: Sequence[GemmConfig],
            launch: Callable[[GemmConfig], None]) -> GemmConfig:
        """Launches `launch(config)` with the chosen candidate and returns it."""
        if is_planning():  # the ahead-of-time table lists every candidate
            for config in candidates:
                launch(config)
            return candidates[0]
        if target.interpreter:
            launch(candidates[0])
            return candidates[0]
        entry = (target.name, repr(key))
        capturing = torch.cuda.is_current_stream_capturing()
        if os.environ.get("QLA_AUTOTUNE") == "0" or (capturing and entry not in self._tuned(target)):
            if capturing and not self._warned_capture and os.environ.get("QLA_AUTOTUNE") != "0":
                self._warned_capture = True
                warnings.warn(f"{self.name}: shape {key} met first inside CUDA-graph capture; using the first "
                              "configuration that runs. Run the model once before capturing to tune it.")
            return self._first_that_runs(entry, candidates, launch, remember=not capturing)
        config = self._tuned(target).get(entry)
        if config is None:
            config = self._tune(key, candidates, launch)
            with self._lock:
                self.best[entry] = config
            self._save(target, entry, config)
        launch(config)
        return config

    def _first_that_runs(self, entry, candidates, launch, remember: bool) -> GemmConfig:
        known = self._untuned.get(entry)
        if known is not None:
            launch(known)
            return known
        for config in candidates:
            try:
                launch(config)
            except Exception as error:
                if not _is_out_of_resources(error):
                    raise
                continue
            if remember:
                self._untuned[entry] = config
            return config
        raise RuntimeError(f"{self.name}: no configuration of {len(candidates)} runs on this GPU for {entry[1]}")

    def _tune(self, key, candidates, launch) -> GemmConfig:
        from triton.testing import do_bench

        timings = {}
        for config in candidates:
            try:
                timings[config] = do_bench(lambda: launch(config), warmup=5, rep=25)
            except Exception as error:
                if not _is_out_of_resources(error):
                    raise
        if not timings:
            raise RuntimeError(f"{self.name}: no configuration of {len(candidates)} runs on this GPU for {key}")
        return min(timings, key=timings.get)

    # ------------------------------------------------------------ the cache on disk

    def _tuned(self, target: Target) -> Dict[Tuple[str, str], GemmConfig]:
        if target.name not in self._loaded:
            with self._lock:
                self._loaded.add(target.name)
                for key, fields in self._read(target).items():
                    self.best.setdefault((target.name, key), GemmConfig(*fields))
        return self.best

    def _read(self, target: Target) -> Dict[str, list]:
        try:
            entries = json.loads(_cache_file(target).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            self._warn_disk(f"cannot read the tuning cache ({error})")
            return {}
        prefix = self.name + "|"
        return {key[len(prefix):]: fields for key, fields in entries.items() if key.startswith(prefix)}

    def _save(self, target: Target, entry, config: GemmConfig) -> None:
        path = _cache_file(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                entries = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                entries = {}
            entries[f"{self.name}|{entry[1]}"] = list(dataclasses.astuple(config))
            scratch = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            scratch.write_text(json.dumps(entries, indent=0, sort_keys=True))
            os.replace(scratch, path)  # atomic: a concurrent reader sees the old or the new file
        except OSError as error:
            self._warn_disk(f"cannot write the tuning cache {path} ({error})")

    def _warn_disk(self, message: str) -> None:
        if not self._warned_disk:
            self._warned_disk = True
            warnings.warn(f"{self.name}: {message}; tuning stays in memory (set QLA_TUNING_CACHE to a writable folder)")

