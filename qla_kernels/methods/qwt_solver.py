"""QwT's closed-form solver: streaming fp64 normal equations of a block's correction, the ridge
regression per output channel with the held-out R² gate, and the group-wise 1×1 form of CNN
blocks. `methods.qwt.calibrate` feeds it the block inputs and errors and attaches what it solves."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch

from ..nn.compensation import ConvQwTCompensation


class NormalEquations:
    """Streaming fp64 sums over tokens: XᵀX, XᵀY, per-output Σy² and Σy, and the token count."""

    def __init__(self, d_in: int, d_out: int):
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.xty = torch.zeros(d_in, d_out, dtype=torch.float64)
        self.y_sq = torch.zeros(d_out, dtype=torch.float64)
        self.y_sum = torch.zeros(d_out, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.xtx += x.t() @ x
        self.xty += x.t() @ y
        self.y_sq += y.square().sum(dim=0)
        self.y_sum += y.sum(dim=0)
        self.count += x.shape[0]

    def sse(self, w: torch.Tensor) -> torch.Tensor:
        """Per-output sum of squared errors of the predictions X·w."""
        return self.y_sq - 2 * (w * self.xty).sum(dim=0) + (w * (self.xtx @ w)).sum(dim=0)

    def sst(self) -> torch.Tensor:
        return self.y_sq - self.y_sum.square() / max(self.count, 1)

    def r2(self, w: torch.Tensor) -> float:
        """Coefficient of determination of X·w pooled over outputs (nan without tokens or variance)."""
        sst = self.sst().sum()
        if self.count == 0 or sst <= 0:
            return float("nan")
        return float(1 - self.sse(w).sum() / sst)


class Accumulator:
    """Normal equations of the fitting tokens and of the held-out tokens (for the R² gate)."""

    def __init__(self, d_in: int, d_out: int):
        self.fit = NormalEquations(d_in + 1, d_out)
        self.heldout = NormalEquations(d_in + 1, d_out)

    def add(self, x: torch.Tensor, y: torch.Tensor, heldout: torch.Tensor) -> None:
        x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        y = y.double()
        self.fit.add(x[~heldout], y[~heldout])
        self.heldout.add(x[heldout], y[heldout])

    def _solve(self, ridge: float) -> Tuple[torch.Tensor, float]:
        xtx = self.fit.xtx
        scale = torch.diagonal(xtx).mean().clamp_min(1e-12)
        system = xtx + ridge * scale * torch.eye(xtx.shape[0], dtype=torch.float64)
        eigenvalues = torch.linalg.eigvalsh(system)
        condition = float(eigenvalues[-1] / eigenvalues[0].clamp_min(1e-300))
        return torch.cholesky_solve(self.fit.xty, torch.linalg.cholesky(system)), condition

    def solve(self, ridges: Sequence[float]) -> "Solution":
        """Each output channel is its own regression: it takes the ridge with the lowest held-out
        error. The block is kept if its pooled held-out R² is positive (the paper's rule), and
        within it the channels whose own held-out R² is positive. Without held-out tokens: the
        first ridge and the fit R²."""
        gate = self.heldout if self.heldout.count else self.fit
        candidates = [self._solve(ridge) for ridge in (ridges if self.heldout.count else ridges[:1])]
        errors = torch.stack([gate.sse(w) for w, _ in candidates])
        best = errors.argmin(dim=0)
        w = torch.stack([w for w, _ in candidates])[best, :, torch.arange(best.numel())].t()
        sst = gate.sst()
        # The paper's gate on the whole block (pooled R² > 0), then per output channel.
        keep = (sst > 0) & (errors.min(dim=0).values < sst) & (gate.r2(w) > 0)
        chosen = torch.tensor([ridges[i] for i in best.tolist()], dtype=torch.float64)[keep]
        return Solution(
            weight=w * keep, kept_fraction=float(keep.double().mean()), r2_fit=self.fit.r2(w),
            r2_heldout=self.heldout.r2(w), condition_number=max(c for _, c in candidates),
            ridge=float(chosen.median()) if chosen.numel() else float("nan"),
        )


class ConvAccumulator:
    """Normal equations of a CNN block's group-wise 1×1 compensation: per group of input channels
    (64 channels where the widths allow, as in the QwT paper), one regression of that group's
    output channels on its input channels, sampled at the block's stride."""

    GROUP_CHANNELS = 64

    def __init__(self, d_in: int, d_out: int, stride: int):
        groups = d_in // self.GROUP_CHANNELS
        self.groups = groups if groups > 1 and d_in % self.GROUP_CHANNELS == 0 and d_out % groups == 0 else 1
        self.stride = stride
        self.parts = [Accumulator(d_in // self.groups, d_out // self.groups) for _ in range(self.groups)]

    def add(self, x: torch.Tensor, y: torch.Tensor, heldout: torch.Tensor) -> None:
        """x [tokens, d_in], y [tokens, d_out] (already strided, channels last)."""
        for part, xs, ys in zip(self.parts, x.chunk(self.groups, dim=1), y.chunk(self.groups, dim=1)):
            part.add(xs, ys, heldout)

    @property
    def fit(self) -> NormalEquations:
        return self.parts[0].fit

    @property
    def heldout(self) -> NormalEquations:
        return self.parts[0].heldout

    def solve(self, ridges: Sequence[float]) -> "Solution":
        """Each group solved as `Accumulator.solve`; the report pools the groups (means)."""
        solutions = [part.solve(ridges) for part in self.parts]
        mean = lambda values: float(torch.tensor(values, dtype=torch.float64).nanmean())  # noqa: E731
        return Solution(
            weight=torch.cat([s.weight for s in solutions], dim=1),  # [d_in / groups + 1, d_out]
            kept_fraction=mean([s.kept_fraction for s in solutions]), r2_fit=mean([s.r2_fit for s in solutions]),
            r2_heldout=mean([s.r2_heldout for s in solutions]),
            condition_number=max(s.condition_number for s in solutions), ridge=mean([s.ridge for s in solutions]),
        )

    def compensation(self, solution: "Solution", device) -> ConvQwTCompensation:
        w = solution.weight
        return ConvQwTCompensation(w[:-1].t().float().contiguous().to(device), w[-1].float().to(device),
                                   self.groups, self.stride)


def conv_tokens(x: torch.Tensor, y: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
    """(input tokens at the output's positions, output tokens, stride) of an NCHW block, or None
    when the output grid is not the input grid sampled at one stride."""
    stride = max(1, round(x.shape[2] / y.shape[2]))
    sampled = x[:, :, ::stride, ::stride]
    if sampled.shape[2:] != y.shape[2:]:
        return None
    channels_last = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    return channels_last(sampled), channels_last(y), stride


@dataclasses.dataclass
class Solution:
    weight: torch.Tensor  # [d_in + 1, d_out], bias as the last row
    kept_fraction: float
    r2_fit: float
    r2_heldout: float
    condition_number: float
    ridge: float


def heldout_mask(shape: torch.Size, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Held-out tokens, chosen whole samples at a time: tokens of one image or sentence are
    correlated, so holding out single tokens would judge the fit on near-copies of its data."""
    samples = torch.rand(shape[0], generator=generator) < fraction
    return samples.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
