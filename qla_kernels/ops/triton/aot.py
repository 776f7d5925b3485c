"""Ahead-of-time compilation of every shipped kernel configuration, without a GPU.

    python -m qla_kernels.ops.triton.aot [--json FILE]

Compiles the fused GEMM (each sm_90 / sm_80 configuration × representative epilogues and weight
formats), the requantization kernel, the activation pre-kernel (quantizing and decode) and QLA's
DW-separable down path with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, then runs ptxas -v on each
PTX for register and spill counts. It reports whether sm_90 code uses wgmma. Must run without
TRITON_INTERPRET (the interpreter replaces kernels by Python functions), so tests call it in a
subprocess. Exits non-zero if a kernel fails to compile or spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .dwsep import dwsep_down_kernel
from .fused_linear import fused_linear_kernel, requantize_rows_kernel
from .launch import DWSEP_TILE
from ..dispatch import interpreting
from .quantize import quantize_activation_kernel
from .tuning import SM80_GEMM_CONFIGS, SM90_GEMM_CONFIGS

# (name, weight format code, activation code, requant, lowrank, zero point, group scale per tile,
#  split-K phase)
EPILOGUES = (
    ("w8a8_every_epilogue_piece", 0, 1, False, True, False, True, 0),
    ("w8a8_swiglu_zero_point", 0, 5, False, True, True, True, 0),
    ("w8a8_geglu_tanh_requant", 0, 7, True, False, False, True, 0),
    ("w8a8_quick_gelu_requant", 0, 4, True, False, False, True, 0),
    ("w4a16_swiglu", 3, 5, False, False, False, True, 0),
    ("w4a8_requant", 1, 1, True, False, False, True, 0),
    ("w4a8_groups_full_epilogue", 2, 0, False, True, False, True, 0),
    ("w4a16_full_epilogue", 3, 0, False, True, False, True, 0),
    ("w4a16_split_k_partial_sums", 3, 0, False, True, False, True, 1),
    ("w4a16_split_k_reduce_full_epilogue", 3, 0, False, True, False, True, 2),
)


def _ptxas() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else "ptxas"


def _resource_usage(ptx: str, arch: str) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", path, "-o", os.path.join(folder, "k.cubin")],
                                capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout
    registers = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(stores.group(1)) if stores else 0,
        "spill_loads": int(loads.group(1)) if loads else 0,
    }


def _compile(kernel, pointer_types: Dict[str, str], scalars: Dict[str, str], constexprs: Dict[str, object],
             capability: int, num_warps: int, num_stages: int) -> Dict[str, object]:
    """Compiles like the JIT would for 16-byte-aligned tensors and strides / K divisible by 16 (the
    specialization Triton applies at run time to real model shapes)."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = scalars.get(name, "i32")
            if name.startswith("stride_") or name in ("K", "KC", "GROUP_K", "K_PER_SPLIT"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    return {"wgmma": "wgmma" in ptx, "shared_bytes": compiled.metadata.shared, **_resource_usage(ptx, arch)}


GEMM_POINTERS = {
    "a_ptr": "*i8", "a_scale_ptr": "*fp32", "a_zero_ptr": "*i8", "w_ptr": "*i8", "w_scale_ptr": "*fp32",
    "w_group_ptr": "*i8", "w_colsum_ptr": "*i32", "t_ptr": "*fp16", "u_ptr": "*fp16", "xc_ptr": "*fp16",
    "wc_ptr": "*fp16", "bias_ptr": "*fp16", "residual_ptr": "*fp16", "out_ptr": "*fp16",
    "row_absmax_ptr": "*i32", "gather_ptr": "*i32", "scatter_ptr": "*i32", "partial_ptr": "*fp32",
}


def compile_all() -> List[Dict[str, object]]:
    rows = []
    for capability, configs in ((90, SM90_GEMM_CONFIGS), (80, SM80_GEMM_CONFIGS)):
        for config in configs:
            for name, fmt, activation, requant, lowrank, zero, per_tile, split_phase in EPILOGUES:
                pointers = dict(GEMM_POINTERS, w_ptr="*i8" if fmt == 0 else "*u8",
                                out_ptr="*fp32" if requant else "*fp16")
                if fmt == 3:  # fp16 activations; the zero points ride in the group pointer
                    pointers.update(a_ptr="*fp16", w_group_ptr="*u8")
                constexprs = dict(
                    WEIGHT_FORMAT=fmt, A_SCALE_PER_ROW=True, HAS_ZERO=zero, ZERO_PER_ROW=False,
                    HAS_LOWRANK=lowrank, HAS_FULLRANK=False, MAIN_IEEE=False, LOWRANK_IEEE=False, FULLRANK_IEEE=False,
                    HAS_BIAS=True, ACTIVATION=activation, HAS_RESIDUAL=True, REQUANT=requant, GATHER=False,
                    SCATTER=False, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                    BLOCK_R=32, GROUP_M=config.group_m, GROUP_SCALE_PER_TILE=per_tile,
                    SPLIT_PHASE=split_phase, K_SPLITS=4 if split_phase else 1,
                )
                result = _compile(fused_linear_kernel, pointers, {}, constexprs, capability,
                                  config.num_warps, config.num_stages)
                rows.append({"kernel": "fused_linear", "epilogue": name, "arch": capability,
                             "config": list(config.__dict__.values()), **result})
        rows.append({"kernel": "requantize_rows", "arch": capability, **_compile(
            requantize_rows_kernel, {"y_ptr": "*fp32", "row_absmax_ptr": "*i32", "q_ptr": "*i8", "scale_ptr": "*fp32"},
            {}, dict(QMAX=127, BLOCK_M=16, BLOCK_N=256), capability, 4, 1)})
        for norm, has_t, float_output, t_from_input, normed_output in (
                (0, False, False, False, False), (1, True, False, False, False), (1, True, False, True, False),
                (1, True, False, False, True), (1, True, False, True, True), (2, True, False, False, False),
                (2, True, True, False, False)):
            pointers = {"x_ptr": "*fp16", "q_ptr": "*fp16" if float_output else "*i8", "scale_ptr": "*fp32",
                        "static_scale_ptr": "*fp32", "zero_ptr": "*i8", "norm_w_ptr": "*fp16", "norm_b_ptr": "*fp16",
                        "down_ptr": "*fp16", "t_ptr": "*fp16", "normed_ptr": "*fp16"}
            constexprs = dict(QMIN=-128, QMAX=127, NORM=norm, HAS_NORM_WEIGHT=norm > 0, HAS_NORM_BIAS=norm == 1,
                              STATIC=False, HAS_ZERO=False, CENTER=False, HAS_T=has_t, T_IEEE=False,
                              T_FROM_INPUT=t_from_input, FLOAT_OUTPUT=float_output, NORMED_OUTPUT=normed_output,
                              BLOCK_M=16, BLOCK_K=256, BLOCK_R=32)
            kernel = ("normalize_activation" if float_output else
                      "normalize_quantize_activation" if normed_output else "quantize_activation")
            rows.append({"kernel": kernel, "norm": norm, "t_from_input": t_from_input,
                         "arch": capability, **_compile(quantize_activation_kernel, pointers, {"eps": "fp32"},
                                                        constexprs, capability, 4, 1)})
        for dtype in ("fp16", "bf16"):
            pointers = {"h_ptr": f"*{dtype}", "dw_ptr": "*fp32", "dw_bias_ptr": "*fp32", "down_ptr": f"*{dtype}",
                        "down_bias_ptr": "*fp32", "t_ptr": f"*{dtype}"}
            block_t, block_c, warps = DWSEP_TILE
            constexprs = dict(HAS_DW_BIAS=True, HAS_DOWN_BIAS=True, IEEE=False, BLOCK_T=block_t, BLOCK_C=block_c,
                              BLOCK_R=64)
            rows.append({"kernel": "dwsep_down", "dtype": dtype, "arch": capability,
                         **_compile(dwsep_down_kernel, pointers, {}, constexprs, capability, warps, 1)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the per-kernel report here")
    args = parser.parse_args(argv)
    if interpreting():
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    rows = compile_all()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    spilled = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    for row in rows:
        print(json.dumps(row))
    print(f"{len(rows)} kernels compiled, {len(spilled)} spill", file=sys.stderr)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
