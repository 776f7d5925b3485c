"""Row maps of the fused linear (Swin's window order): which row each GEMM row reads or writes.

A map is conversion-time data (a block's window order), so it is checked once, where it is built,
and every call after that only checks that it indexes the right number of rows (no host sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowMap(NamedTuple):
    """GEMM row m ↔ row `indices[m]` of a matrix of `rows` rows; −1 is a padding row (gathered as
    the value zero, or dropped when scattered).

    Build maps with `RowMap.build` (checked) or `batched` (derived from a checked one). A map
    constructed directly is trusted as it is; the kernels treat an entry outside [0, rows) as −1,
    so no backend ever reads or writes outside the matrix."""

    indices: torch.Tensor  # int32 [GEMM rows], contiguous
    rows: int

    @classmethod
    def build(cls, indices: torch.Tensor, rows: int) -> "RowMap":
        """Checks `indices` (1-D integers in [−1, rows), the non-negative ones distinct) and returns
        the map as int32. ValueError naming the first bad entry otherwise. Reads the values (one
        host sync): build maps at conversion, not per call."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"rows must be a non-negative int, got {rows!r}")
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
                or indices.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ValueError(f"indices must be a 1-D integer tensor, got {getattr(indices, 'shape', type(indices))} "
                             f"{getattr(indices, 'dtype', '')}")
        values = indices.detach().long().cpu()
        outside = ((values < -1) | (values >= rows)).nonzero()
        if outside.numel():
            position = int(outside[0])
            raise ValueError(f"indices[{position}] = {int(values[position])} is outside [-1, {rows}) "
                             f"(the map indexes {rows} rows; -1 marks padding)")
        valid = values[values >= 0]
        if valid.unique().numel() != valid.numel():
            raise ValueError("indices repeat a row: a map sends each row to at most one GEMM row")
        return cls(indices.to(torch.int32).contiguous(), rows)

    def batched(self, batch: int) -> "RowMap":
        """The map for `batch` matrices stacked along the rows: copy b maps into rows
        b·rows .. (b + 1)·rows − 1, padding stays −1 (as checked as the map it comes from)."""
        offsets = torch.arange(batch, device=self.indices.device, dtype=torch.int32)[:, None] * self.rows
        stacked = torch.where(self.indices >= 0, self.indices + offsets, -1).reshape(-1)
        return RowMap(stacked, batch * self.rows)
