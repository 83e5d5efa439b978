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

from typing import List, Optional, Sequence, Tuple

import torch

from .. import parallel as sp
from .plan import MEASURES as MEASURE_NAMES
from .plan import StepKind
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
    # each sample's sums over its rows (one contiguous vector each), read in one transfer
    totals = parts.permute(1, 2, 0).contiguous().sum(-1).tolist()  # [B][2]
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


def check_cfg_halves(x: torch.Tensor) -> None:
    """``cfg_shared_selection`` pairs row i with row i + B/2 (a two-way CFG batch [cond;
    uncond]); refuse a batch whose identical rows say otherwise (a three-way i2v batch)."""
    b = x.shape[0]
    groups = [g for g in decision_groups(x) if len(g) > 1]
    if groups and (b % 2 or any(g != [g[0], g[0] + b // 2] for g in groups)):
        sizes = sorted({len(g) for g in groups})
        raise ValueError(f"cache cfg_shared_selection=True pairs the two halves of a CFG batch "
                         f"[conditional; unconditional], but this batch of {b} holds copies of "
                         f"a clip in groups of {sizes} (e.g. Open-Sora 1.3's three-way i2v "
                         f"batch); accepted: cfg_shared_selection=False")


def group_rows(groups: Sequence[Sequence[int]], flags: Sequence[bool]) -> List[int]:
    """The batch rows of the groups whose flag is set, ascending."""
    return sorted(i for rows, f in zip(groups, flags) if f for i in rows)


# ----------------------------------------------------------------------- measures
def _modulated_input(layout, block, x, bound, trunk_in):
    """The deciding block's timestep-modulated, normalised input (TeaCache)."""
    return layout.modulated_input(block, **bound)


def _first_pair_residual(layout, block, x, bound, trunk_in):
    """What the blocks before the deciding one added to the trunk input (First-Block Cache)."""
    return x - trunk_in


# the function of each measure name (plan.MEASURES, which policies are checked against)
MEASURES = {"modulated_input": _modulated_input, "first_pair_residual": _first_pair_residual}
assert tuple(MEASURES) == MEASURE_NAMES


class AdaptiveRun:
    """The run state of an adaptive policy: the decision groups, the reference each group's
    change is measured against, the policy's per-group state, the stored residual of the blocks
    from the decision point on, and, within a step, the input at the trunk's start and at the
    decision point and the rows that compute (a step decided per clip)."""

    def __init__(self, residual):
        self.residual = residual  # a Feature (the codec and byte counter of the manager)
        self.groups: List[List[int]] = [[0]]
        self.clear()

    def clear(self) -> None:
        self.residual.clear()
        self.reference: Optional[torch.Tensor] = None
        self.states: Optional[list] = None
        self.trunk_in: Optional[torch.Tensor] = None    # this step's input to block 0
        self.residual_in: Optional[torch.Tensor] = None  # the input of the computed part
        self.rows: Optional[torch.Tensor] = None        # rows computing on a per-clip step
        self.sub: Optional[torch.Tensor] = None         # their hidden states between blocks

    def holds_state(self) -> bool:
        return (self.reference is not None or self.states is not None
                or self.residual.shape is not None)

    def start(self, x: torch.Tensor) -> None:
        """A run's first step: who decides with whom."""
        self.groups = decision_groups(x)

    def end_step(self) -> None:
        self.trunk_in = self.residual_in = self.rows = self.sub = None

    def decide(self, policy, layout, block, x, bound, step, num_steps, grid, group,
               counts, state=None) -> Optional[Tuple[int, ...]]:
        """Measure every group's change (one all_gather) and let the policy decide per group:
        None when every clip computes the rest of the trunk, else the batch rows that do
        (empty: every clip takes its stored residual)."""
        now = MEASURES[policy.measure](layout, block, x, bound, self.trunk_in)
        ref, groups = self.reference, self.groups
        changes: List[Optional[float]] = [None] * len(groups)
        if ref is not None and ref.shape == now.shape and self.residual.shape is not None:
            changes = relative_l1(now, ref, grid, group, groups)
        if self.states is None or len(self.states) != len(groups):
            self.states = [policy.new_state() for _ in groups]
        flags = [bool(policy.decide(step, num_steps, c, s)) for c, s in zip(changes, self.states)]
        counts.changes.append(changes)
        counts.group_labels.append([str(StepKind.FULL if f else StepKind.RESIDUAL)
                                    for f in flags])
        rows = group_rows(groups, flags)
        if policy.reference_every_step or all(flags) or ref is None or ref.shape != now.shape:
            self.reference = now
        elif rows:
            idx = torch.tensor(rows, device=now.device)
            self.reference = ref.index_copy(0, idx, now.index_select(0, idx))
        if all(flags):  # the trunk's state here (the layout's form of it, default x)
            self.residual_in = x if state is None else state
            return None
        if rows:
            self.rows, self.sub = torch.tensor(rows, device=x.device), None
        return tuple(rows)

    def residual_output(self, x: torch.Tensor, at: float) -> torch.Tensor:
        """Last block of a skipped step: its input (the input at the decision point, passed
        through) plus the stored residual."""
        return x + self.residual.value(at, x.dtype)

    def mixed_output(self, x: torch.Tensor, sub: torch.Tensor, at: float) -> torch.Tensor:
        """Last block of a step decided per clip: the rows that computed the trunk take ``sub``
        (their sub-batch output) and store their new residual; the others take their input
        (passed through from the decision point) plus their stored residual."""
        rows, self.sub = self.rows, None
        out = self.residual_output(x, at).index_copy_(0, rows, sub)
        self.residual.write_rows_(rows, sub - x.index_select(0, rows))
        return out

    def after_last_block(self, out: torch.Tensor, at: float) -> None:
        if self.residual_in is not None:
            self.residual.update(out - self.residual_in, at)
        self.end_step()
