"""Observers for static activation scales: a bounded sample of a layer's input rows plus its
running range, and the searches that turn them into a per-tensor scale (and zero point).

- "minmax": the whole observed range (never clips).
- "percentile": candidates at the 0.999 / 0.9999 / 0.99999 quantiles of |x| (or of x's two tails
  when asymmetric) and the full range, chosen by the *layer output* error ‖X·Wᵀ − Q(X)·Wᵀ‖².
- "mse": clipping ratios α·range for α in [0.3, 1], chosen by the input's own quantization MSE.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .primitives import asymmetric_scale_zero, dequantize, qrange, quantize_with_scale

PERCENTILES = (0.999, 0.9999, 0.99999)
CLIP_RATIOS = tuple(0.3 + 0.02 * i for i in range(36)) + (1.0,)
METHODS = ("minmax", "percentile", "mse")


class ActivationObserver:
    """Keeps the running min/max of every value and a uniform random sample of at most `max_rows` rows."""

    def __init__(self, max_rows: int = 2048, seed: int = 0):
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Optional[torch.Tensor] = None
        self.seen = 0
        self.minimum = torch.tensor(float("inf"))
        self.maximum = torch.tensor(float("-inf"))

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.minimum = torch.minimum(self.minimum, rows.min())
        self.maximum = torch.maximum(self.maximum, rows.max())
        self.seen += rows.shape[0]
        merged = rows if self.rows is None else torch.cat([self.rows, rows])
        if merged.shape[0] > self.max_rows:
            # Keep each row with equal probability over everything seen (approximately reservoir sampling).
            merged = merged[torch.randperm(merged.shape[0], generator=self.generator)[: self.max_rows]]
        self.rows = merged


def _fake_quantize(x: torch.Tensor, scale: float, zero: int, bits: int) -> torch.Tensor:
    scale_t, zero_t = torch.tensor(scale), torch.tensor(zero, dtype=torch.int8)
    return dequantize(quantize_with_scale(x, scale_t, bits, zero_t), scale_t, zero_t)


def _candidate(low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool) -> Tuple[float, int]:
    if symmetric:
        absmax = torch.maximum(low.abs(), high.abs()).clamp_min(1e-8)
        return float(absmax / qrange(bits)[1]), 0
    scale, zero = asymmetric_scale_zero(low, high, bits)
    return float(scale), int(zero)


def static_scale(
    observer: ActivationObserver,
    bits: int,
    method: str = "percentile",
    symmetric: bool = True,
    weight: Optional[torch.Tensor] = None,
    percentiles: Sequence[float] = PERCENTILES,
) -> Tuple[float, int]:
    """(scale, zero point in the signed domain; 0 when symmetric) for one layer's input."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if observer.rows is None:
        raise ValueError("the observer saw no data")
    full = _candidate(observer.minimum, observer.maximum, bits, symmetric)
    if method == "minmax":
        return full
    x = observer.rows
    if method == "percentile":
        if weight is None:
            raise ValueError("method='percentile' chooses by the layer output: pass the layer's weight")
        values = x.flatten()
        candidates = [full]
        for p in percentiles:
            if symmetric:
                top = torch.quantile(values.abs(), p)
                candidates.append(_candidate(-top, top, bits, True))
            else:
                candidates.append(_candidate(torch.quantile(values, 1 - p), torch.quantile(values, p), bits, False))
        weight = weight.detach().float()
        reference = x @ weight.t()
        errors = [float((_fake_quantize(x, s, z, bits) @ weight.t() - reference).square().sum()) for s, z in candidates]
    else:
        candidates = [_candidate(observer.minimum * a, observer.maximum * a, bits, symmetric) for a in CLIP_RATIOS]
        errors = [float((_fake_quantize(x, s, z, bits) - x).square().sum()) for s, z in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]
