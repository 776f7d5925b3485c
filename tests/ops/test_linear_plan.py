"""LinearPlan.run_quantized: the fused GEMM from codes its caller quantized, as a tensor-parallel
rank of a row-parallel layer runs it (integrations/vllm.py): each rank multiplies its K slice of
the codes, all quantized with the whole row's per-token scale, and the ranks' outputs sum to the
unsplit layer's."""

import dataclasses

import pytest
import torch

import qla_kernels as qk
from qla_kernels.ops.linear_plan import LinearPlan
from qla_kernels.quant.primitives import absmax_scale, quantize_with_scale


def _k_slice(weight, start: int, stop: int):
    """The quantized weight's columns [start, stop) of K (int4 codes are packed two per byte)."""
    packed = 2 if weight.format != "int8" else 1
    fields = {"data": weight.data[:, start // packed:stop // packed].contiguous()}
    if weight.group_scale is not None:
        fields["group_scale"] = weight.group_scale[:, start // weight.k_group:stop // weight.k_group].contiguous()
    return dataclasses.replace(weight, **fields, panels=None)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("config", [qk.W8A8(), qk.W4A8(), qk.W4A8(group_size=32)], ids=str)
def test_k_slices_with_the_whole_rows_scale_sum_to_the_unsplit_layer(config, backend):
    if not qk.backends()[backend].available:
        pytest.skip(qk.backends()[backend].reason)
    torch.manual_seed(0)
    k, n, m = 128, 48, 5
    layer = qk.QuantLinear.from_float(torch.nn.Linear(k, n, bias=False), config)
    x = torch.randn(m, k)
    scale = absmax_scale(x.abs().amax(dim=-1), 8)
    codes = quantize_with_scale(x, scale, 8)
    weight = layer.quantized_weight()
    with qk.use_backend(backend):
        unsplit = LinearPlan(weight, 8).frozen().run(x)
        parts = [LinearPlan(_k_slice(weight, start, start + k // 2), 8).frozen().run_quantized(
            codes[:, start:start + k // 2].contiguous(), scale) for start in (0, k // 2)]
    # Integer parts are exact (the two int32 sums add to the unsplit one); each part's dequantized
    # output is rounded once in fp32, and so is their sum.
    bound = 4 * torch.finfo(torch.float32).eps * (parts[0].abs() + parts[1].abs())
    assert bool(((parts[0] + parts[1] - unsplit).abs() <= bound).all())
