"""Change measures of the adaptive policies, reduced so that every rank takes the same decision
for any number of ranks.

A measure is a relative L1 change ``sum |a - b| / sum |b|`` over all tokens of the batch. Each
rank sums, in float64, per latent row it holds (over batch, frames, width and channels); one
all_gather per step collects the per-row partial sums; every rank drops the padding rows and
adds the real rows in global row order. The per-row vectors are contiguous and equally long on
every rank count, so the same row gives the same partial sum, and the total is the same on
every rank and for 1, 2 or 4 ranks.
"""
from __future__ import annotations

import torch

from .. import parallel as sp
from .selection import TokenGrid


def row_sums(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """|x| summed per local latent row, in float64: [B, T*rows*W, C] -> [rows]."""
    b, _, c = x.shape
    rows = x.reshape(b, grid.frames, grid.local_rows, grid.width, c).permute(2, 0, 1, 3, 4)
    return rows.reshape(grid.local_rows, -1).double().abs().sum(1)


def relative_l1(now: torch.Tensor, before: torch.Tensor, grid: TokenGrid, group) -> float:
    """sum |now - before| / sum |before| over the global token grid (the same on every rank)."""
    parts = torch.stack([row_sums(now - before, grid), row_sums(before, grid)], 1)  # [rows, 2]
    parts = sp.all_gather(parts, group, dim=0)[: grid.rows]  # global row order, no padding
    num, den = parts[:, 0].sum(), parts[:, 1].sum()
    return float(num / den.clamp_min(1e-300))
