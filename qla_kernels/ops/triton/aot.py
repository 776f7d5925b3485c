"""Ahead-of-time compilation of planned launches, without a GPU.

`check_launches(planned)` takes launches recorded by `kernel_launch.planning` (the launch code's
own choices for a target) and compiles each distinct one exactly as Triton's JIT would on that
GPU: the kernel's own binder specializes the arguments, `triton.compile` targets
`GPUTarget("cuda", arch, 32)`, and the ptxas -v log of Triton's cubin build gives registers and
spills. Each result row says whether the launch passes:

- it compiles, within the architecture's shared memory per block (compiled metadata);
- nothing spills;
- on sm_90 a GEMM main loop, and the quantized attention's products, use wgmma;
- a launch whose result is promised bit-exact (FP contraction off) contains no `fma.rn.f32`
  outside libdevice's erf (whose polynomial is fused by design);
- row offsets are 64-bit: no 32-bit multiply takes a row stride (an LM head's output at prefill,
  or a weight with N·K >= 2**31, would wrap).

Must run without TRITON_INTERPRET (the interpreter replaces kernels by Python functions); the
table of real model calls and the command line are in `qla_kernels.launch_table`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from .kernel_launch import PlannedLaunch, Target, argument_specializations, kernel_name

# Shared memory one thread block may use (opt-in maximum): H100/H200 227 KB, A100 163 KB.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
# The row strides of each kernel: a product row × stride must be formed in 64 bits.
ROW_STRIDES = {
    "fused_linear_kernel": ("stride_am", "stride_wn", "stride_tm", "stride_xm", "stride_rm", "stride_om"),
    "implicit_conv_kernel": ("stride_xp", "stride_wn", "stride_tm", "stride_xm", "stride_rm", "stride_om"),
    "depthwise_conv_kernel": ("stride_xp", "stride_wn", "stride_tm", "stride_xm", "stride_rm", "stride_om"),
    "requantize_rows_kernel": ("stride_ym", "stride_qm"),
    "quantize_activation_kernel": ("stride_xm", "stride_qm", "stride_tm"),
    "rotate_quantize_kernel": ("stride_xm", "stride_qm", "stride_tm"),
    "dwsep_down_kernel": ("stride_hb",),
    "quantized_attention_kernel": ("stride_qb", "stride_qt", "stride_kt", "stride_vt", "stride_ot", "stride_mq",
                                   "stride_mk"),
}
# Activations whose epilogue calls libdevice's erf (fused multiply-adds inside by design).
_ERF_ACTIVATIONS = (1, 6)  # reference.ACTIVATIONS: gelu, geglu


def ptxas_usage(log: str) -> Dict[str, int]:
    """Registers and spill bytes from the ptxas -v log Triton's own cubin build printed."""
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(stores.group(1)) if stores else 0,
        "spill_loads": int(loads.group(1)) if loads else 0,
    }


def narrow_row_products(ptx: str, kernel: str, runtime_names: Sequence[str], specs: Sequence[tuple]) -> Dict[str, int]:
    """{'narrow': 32-bit multiplies taking a row stride, 'wide': 64-bit uses of one} in the PTX.
    PTX parameters are numbered over the runtime arguments Triton did not turn into constants."""
    names = [name for name, spec in zip(runtime_names, specs) if spec[0] != "constexpr"]
    registers = set()
    narrow = wide = 0
    for stride in ROW_STRIDES.get(kernel, ()):
        if stride in names:
            parameter = rf"\[{kernel}_param_{names.index(stride)}\];"
            registers.update(re.findall(rf"ld\.param\.[bsu]32\s+(%r\d+), {parameter}", ptx))
            wide += len(re.findall(rf"ld\.param\.s32\s+%rd\d+, {parameter}", ptx))  # loaded sign-extended
    for line in ptx.splitlines():
        operands = set(re.findall(r"%r\d+\b", line))
        if not operands & registers:
            continue
        instruction = line.split(None, 1)[0] if line.strip() else ""
        if re.match(r"(mul|mad)\.lo\.[su]32", instruction):
            narrow += 1
        elif re.match(r"(mul|mad)\.wide\.[su]32|cvt\.[su]64\.[su]32", instruction):
            wide += 1
    return {"narrow": narrow, "wide": wide}


def compile_launch(launch: PlannedLaunch, arch: int) -> Dict[str, object]:
    """One planned launch compiled for sm_`arch` as the JIT compiles it; the checks' inputs."""
    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    meta = dict(launch.meta)
    bound, jit_specialization, options = binder(*launch.args, **meta)
    ours = [spec for _, spec in argument_specializations(kernel, launch.args)]
    runtime = [param for param in kernel.params if not param.is_constexpr]
    jit_runtime = [spec for param, spec in zip(kernel.params, jit_specialization) if not param.is_constexpr]
    if [tuple(s) for s in jit_runtime] != [tuple(s) for s in ours]:
        raise AssertionError(f"{kernel_name(kernel)}: kernel_launch.specialization differs from the JIT's: "
                             f"{ours} vs {jit_runtime}")
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, jit_specialization, options)
    # Triton's own ptxas run (with its flags: --fmad=false without contraction) reports the cubin's
    # registers and spills; it runs only when the kernel is compiled, not loaded from Triton's cache.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    ptx = compiled.asm["ptx"]
    name = kernel_name(kernel)
    products = narrow_row_products(ptx, name, [p.name for p in runtime], ours)
    return {
        "shared_bytes": compiled.metadata.shared,
        "wgmma": "wgmma" in ptx,
        "fma": len(re.findall(r"\bfma\.rn(\.ftz)?\.f32\b", ptx)),
        "narrow_row_products": products["narrow"],
        "wide_row_products": products["wide"],
        **ptxas_usage(log.getvalue()),
    }


def failures(launch: PlannedLaunch, arch: int, result: Dict[str, object]) -> List[str]:
    """What is wrong with a compiled launch (empty: it passes)."""
    problems = []
    if result["shared_bytes"] > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"needs {result['shared_bytes']} B of shared memory, sm_{arch} has {SHARED_MEMORY_LIMIT[arch]}")
    if result["spill_stores"] or result["spill_loads"]:
        problems.append(f"spills ({result['spill_stores']} B stores, {result['spill_loads']} B loads)")
    if not 0 < result["registers"] <= 255:
        problems.append(f"{result['registers']} registers")
    name, meta = kernel_name(launch.kernel), launch.meta
    if arch == 90 and name == "fused_linear_kernel" and meta.get("SPLIT_PHASE", 0) != 2 and not result["wgmma"]:
        problems.append("the sm_90 GEMM main loop does not use wgmma")
    if arch == 90 and name == "implicit_conv_kernel" and not result["wgmma"]:
        problems.append("the sm_90 convolution's main loop does not use wgmma")
    if arch == 90 and name == "quantized_attention_kernel" and not result["wgmma"]:
        problems.append("the sm_90 attention products do not use wgmma")
    erf = name == "fused_linear_kernel" and meta.get("ACTIVATION") in _ERF_ACTIVATIONS
    if not meta["enable_fp_fusion"] and not erf and result["fma"]:
        problems.append(f"{result['fma']} fma.rn.f32 in a launch promised exact (FP contraction off)")
    if result["narrow_row_products"] or (name in ROW_STRIDES and not result["wide_row_products"]):
        problems.append(f"row offsets are not 64-bit ({result['narrow_row_products']} 32-bit multiplies of a "
                        f"row stride, {result['wide_row_products']} 64-bit)")
    return problems


def describe(launch: PlannedLaunch) -> Dict[str, object]:
    """The launch's compile-relevant choices, for reports."""
    return {"kernel": kernel_name(launch.kernel),
            "meta": {key: value for key, value in sorted(launch.meta.items())},
            "args": [list(spec) for _, spec in argument_specializations(launch.kernel, launch.args)]}


def result_cache_dir() -> Path:
    return Path(os.environ.get("QLA_AOT_CACHE") or Path.home() / ".cache" / "qla_kernels" / "aot")


def _cache_path(launch: PlannedLaunch, arch: int) -> Path:
    """Results are reused only for the same kernel source (Triton's cache key of the function and
    what it calls), Triton version, launch and architecture: the same compile."""
    identity = json.dumps([launch.kernel.cache_key, triton.__version__, arch, describe(launch)], sort_keys=True,
                          default=str)
    return result_cache_dir() / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.json"


_WORK: List[tuple] = []
_USE_CACHE = True


def _check_one(index: int) -> Dict[str, object]:
    target, launch = _WORK[index]
    row = {"arch": target.arch, **describe(launch)}
    cached = _cache_path(launch, target.arch)
    row["cached"] = _USE_CACHE and cached.exists()
    if row["cached"]:
        result = json.loads(cached.read_text())
    else:
        try:
            result = compile_launch(launch, target.arch)
        except Exception as error:  # a launch that does not compile is a failure to report, not a crash
            return {**row, "problems": [f"does not compile: {type(error).__name__}: {str(error)[:400]}"]}
        if _USE_CACHE:
            cached.parent.mkdir(parents=True, exist_ok=True)
            scratch = cached.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(result))
            os.replace(scratch, cached)
    return {**row, **result, "problems": failures(launch, target.arch, result)}


def check_launches(work: Sequence[tuple], jobs: Optional[int] = None, progress=None,
                   cache: bool = True) -> List[Dict[str, object]]:
    """Compiles every (Target, PlannedLaunch) of `work` and checks it; one result row each.
    `jobs` worker processes (forked, default: the CPU count); `progress(done, total)` after each.
    `cache`: reuse the results of identical compiles from earlier runs (QLA_AOT_CACHE, default
    ~/.cache/qla_kernels/aot)."""
    global _WORK, _USE_CACHE
    _WORK, _USE_CACHE = list(work), cache
    jobs = jobs or os.cpu_count() or 1
    rows: List[Dict[str, object]] = []
    if jobs == 1 or len(_WORK) <= 1:
        for index in range(len(_WORK)):
            rows.append(_check_one(index))
            if progress:
                progress(len(rows), len(_WORK))
        return rows
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for row in pool.imap(_check_one, range(len(_WORK)), chunksize=1):
            rows.append(row)
            if progress:
                progress(len(rows), len(_WORK))
    return rows


def for_targets(planned: Dict[Target, Sequence[PlannedLaunch]]) -> List[tuple]:
    """(target, launch) pairs with one launch per distinct compile key and architecture."""
    seen, work = set(), []
    for target, launches in planned.items():
        for launch in launches:
            key = (target.arch, launch.key)
            if key not in seen:
                seen.add(key)
                work.append((target, launch))
    return work
