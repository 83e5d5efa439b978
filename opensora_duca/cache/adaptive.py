"""Change measures of the adaptive policies, per decision group (the rows of one clip: its
classifier-free-guidance copies), reduced so that every rank takes the same decision for any
number of ranks and a clip's decision does not depend on its batch-mates.

A measure is a relative L1 change ``sum |a - b| / sum |b|`` over all tokens of one group's
rows. Each rank sums, in float64, per sample and per latent row it holds (over frames, width
and channels, one sample at a time, so the arithmetic is the same in any batch); one all_gather
per step collects the per-row partial sums of every sample; every rank drops the padding rows,
adds each sample's real rows in global row order and a group's samples in row order. The
per-row vectors are contiguous and equally long on every rank count, so the same row gives the
same partial sum, and the totals are the same on every rank, for 1, 2 or 4 ranks and in any
batch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import parallel as sp
from .selection import TokenGrid


def row_sums(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """|x| summed per local latent row, in float64: [B, T*rows*W, C] -> [rows]."""
    b, _, c = x.shape
    rows = x.reshape(b, grid.frames, grid.local_rows, grid.width, c).permute(2, 0, 1, 3, 4)
    return rows.reshape(grid.local_rows, -1).double().abs().sum(1)


def relative_l1(now: torch.Tensor, before: torch.Tensor, grid: TokenGrid, group,
                groups: Sequence[Sequence[int]]) -> List[float]:
    """Per group of batch rows: sum |now - before| / sum |before| over the global token grid
    (the same on every rank, and for a group the same in any batch)."""
    b = now.shape[0]
    parts = torch.stack([torch.stack([row_sums(now[i:i + 1] - before[i:i + 1], grid),
                                      row_sums(before[i:i + 1], grid)], 1)
                         for i in range(b)], 1)                   # [local rows, B, 2]
    parts = sp.all_gather(parts, group, dim=0)[: grid.rows]       # global row order, no padding
    per_sample = parts.permute(1, 2, 0).contiguous()              # [B, 2, rows]
    totals = [(float(per_sample[i, 0].sum()), float(per_sample[i, 1].sum())) for i in range(b)]
    out = []
    for rows in groups:
        num = den = 0.0
        for i in rows:
            num, den = num + totals[i][0], den + totals[i][1]
        out.append(num / max(den, 1e-300))
    return out


def decision_groups(x: torch.Tensor) -> List[List[int]]:
    """The batch rows that decide together: rows with bit-identical inputs (a clip's
    classifier-free-guidance copies, which every sampler feeds the same latents), in order of
    their first row."""
    b = x.shape[0]
    if b == 1:
        return [[0]]
    inverse = torch.unique(x.detach().reshape(b, -1), dim=0, return_inverse=True)[1].tolist()
    groups: dict = {}
    for row, g in enumerate(inverse):
        groups.setdefault(g, []).append(row)
    return list(groups.values())


def group_rows(groups: Sequence[Sequence[int]], flags: Sequence[bool]) -> Optional[List[int]]:
    """The batch rows of the groups whose flag is set, ascending."""
    return sorted(i for rows, f in zip(groups, flags) if f for i in rows)
