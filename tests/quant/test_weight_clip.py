import pytest
import torch

import qla_kernels as qk
from qla_kernels.quant.weight import clip_weight, quantize_weight

CONFIGS = [qk.W8A8(), qk.W4A4(), qk.W4A8(), qk.W4A8(group_size=32), qk.W4A16(group_size=32)]


def _row_error(weight, config, method):
    return (quantize_weight(clip_weight(weight, config, method), config).dequantize() - weight).square().sum(dim=1)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_clipping_never_loses_to_rounding_and_wins_on_heavy_tails(config):
    """Every candidate set contains the unclipped range, so no channel gets worse; on Student-t
    weights (heavy tails, like trained layers) clipping lowers the total error. Measured error
    ratios (mse / percentile): per-channel int4 0.87 / 0.89, int4 groups of 32 0.94 / 0.97,
    W4A16 groups 0.98 / 0.99, int8 0.999 / 0.995 (little to gain at 8 bits)."""
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((48, 128)) * 0.02
    plain = _row_error(weight, config, "none")
    for method in ("mse", "percentile"):
        clipped = _row_error(weight, config, method)
        assert (clipped <= plain * (1 + 1e-6)).all()
        per_channel_int4 = config.weight_bits == 4 and config.group_size is None
        assert clipped.sum() < (0.92 if per_channel_int4 else 0.9995) * plain.sum()


def test_none_returns_the_weight_and_bad_method():
    weight = torch.randn(4, 32)
    assert torch.equal(clip_weight(weight, qk.W8A8(), "none"), weight)
    with pytest.raises(ValueError, match="weight clip method"):
        clip_weight(weight, qk.W8A8(), "absmax")
