"""Builders for op tests: random quantized weights per format and an independent fp64 oracle."""

import functools

import torch

import qla_kernels as qk
from qla_kernels.formats.weights import QuantizedWeight
from qla_kernels.quant import quantize_weight

CONFIG_FOR_FORMAT = {
    "int8": lambda group: qk.W8A8(),
    "int4": lambda group: qk.W4A8(),
    "int4_int8_groups": lambda group: qk.W4A8(group_size=group),
    "uint4_asym_groups": lambda group: qk.W4A16(group_size=group),
}
INTEGER_FORMATS = ("int8", "int4", "int4_int8_groups")


@functools.lru_cache(maxsize=64)  # real-shape GPU tests reuse 14336×4096 weights across dtypes; callers never mutate
def random_weight(fmt: str, n: int, k: int, group: int = 16, seed: int = 0) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) * 0.05
    return quantize_weight(w, CONFIG_FOR_FORMAT[fmt](group))


def random_int8(m: int, k: int, seed: int = 0, bits: int = 8):
    generator = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    a = torch.randint(lo, hi + 1, (m, k), generator=generator, dtype=torch.int8)
    scale = torch.rand(m, generator=generator) * 0.02 + 1e-3
    return a, scale


def oracle_main_segment(a, a_scale, weight: QuantizedWeight, a_zero_point=None):
    """Dequantize first, in fp64 (a different order of operations than the reference's int32 accumulator)."""
    if weight.format == "uint4_asym_groups":
        w = weight.dequantize().to(a.dtype).double()
        return a.double() @ w.t()
    a_values = a.double()
    if a_zero_point is not None:
        a_values = a_values - a_zero_point.double().reshape(-1, 1)
    a_values = a_values * a_scale.double().reshape(-1, 1)
    w = weight.integer().double() * weight.scale.double()[:, None]
    return a_values @ w.t()


def at_thread_counts(call, counts=(1, 2)):
    """call()'s result at each of torch's intra-op thread counts, the count restored after."""
    threads = torch.get_num_threads()
    results = []
    for count in counts:
        torch.set_num_threads(count)
        try:
            results.append(call())
        finally:
            torch.set_num_threads(threads)
    return results
