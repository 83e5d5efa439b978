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

import copy
from typing import List, Optional, Sequence, Tuple

import torch

from .. import parallel as sp
from .plan import MEASURES as MEASURE_NAMES
from .selection import TokenGrid
from .state import Feature


def row_sums(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """|x| summed per local latent row, in float64: [B, T*rows*W, C] -> [rows]."""
    b, _, c = x.shape
    rows = x.reshape(b, grid.frames, grid.local_rows, grid.width, c).permute(2, 0, 1, 3, 4)
    return rows.reshape(grid.local_rows, -1).double().abs().sum(1)


def gathered_totals(parts: torch.Tensor, grid: TokenGrid, group) -> List[List[float]]:
    """Per-row partial sums ``parts`` [local rows, B, k] (float64) -> each sample's k totals
    over the global rows ([B][k], host floats): one all_gather, padding rows dropped, every
    sample's rows added in global row order (the same on every rank and rank count)."""
    parts = sp.all_gather(parts, group, dim=0)[: grid.rows]       # global row order, no padding
    # each sample's sums over its rows (one contiguous vector each), read in one transfer
    return parts.permute(1, 2, 0).contiguous().sum(-1).tolist()


def group_totals(totals: Sequence[Sequence[float]],
                 groups: Sequence[Sequence[int]]) -> List[List[float]]:
    """Each group's sums: its samples' totals added in row order."""
    out = []
    for rows in groups:
        acc = [0.0] * len(totals[rows[0]])
        for i in rows:
            acc = [a + v for a, v in zip(acc, totals[i])]
        out.append(acc)
    return out


def relative_l1(now: torch.Tensor, before: torch.Tensor, grid: TokenGrid, group,
                groups: Sequence[Sequence[int]]) -> List[float]:
    """Per group of batch rows: sum |now - before| / sum |before| over the global token grid
    (the same on every rank, and for a group the same in any batch)."""
    b = now.shape[0]
    parts = torch.stack([torch.stack([row_sums(now[i:i + 1] - before[i:i + 1], grid),
                                      row_sums(before[i:i + 1], grid)], 1)
                         for i in range(b)], 1)                   # [local rows, B, 2]
    return [num / max(den, 1e-300)
            for num, den in group_totals(gathered_totals(parts, grid, group), groups)]


def decision_groups(x: torch.Tensor) -> List[List[int]]:
    """The batch rows that decide together: rows with bit-identical inputs (a clip's
    classifier-free-guidance copies, which every sampler feeds the same latents), in order of
    their first row. Clips of one seed (other captions, the same noise) look alike at the first
    step only: :meth:`AdaptiveRun.refine` parts them at the second."""
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
    """What the blocks before the deciding one added to the trunk input (First-Block Cache;
    SpeCa compares it with its forecast)."""
    return x - trunk_in


def _trunk_input(layout, block, x, bound, trunk_in):
    """The trunk's input (EasyCache: its change, against the output's)."""
    return x


def _nothing(layout, block, x, bound, trunk_in):
    return None


# the function of each measure name (plan.MEASURES, which policies are checked against)
MEASURES = {"modulated_input": _modulated_input, "first_pair_residual": _first_pair_residual,
            "trunk_input": _trunk_input, "first_pair_forecast": _first_pair_residual,
            "none": _nothing}
assert tuple(MEASURES) == MEASURE_NAMES


class AdaptiveRun:
    """The run state of an adaptive policy: the decision groups, the reference each group's
    change is measured against, the policy's per-group state, the stored residual of the blocks
    from the decision point on, and, within a step, the input at the trunk's start and at the
    decision point and the rows that compute (a step decided per clip)."""

    def __init__(self, residual):
        self.residual = residual  # a Feature (the codec and byte counter of the manager)
        self.groups: List[List[int]] = [[0]]
        self.per_group: Optional[list] = None
        self.clear()

    def clear(self) -> None:
        self.residual.clear()
        for pair in self.per_group or ():
            for feature in pair:
                feature.clear()
        self.per_group: Optional[list] = None  # SpeCa: per group, (first pair, rest) Features
        self.reference: Optional[torch.Tensor] = None
        self.states: Optional[list] = None
        self.trunk_in: Optional[torch.Tensor] = None    # this step's input to block 0
        self.residual_in: Optional[torch.Tensor] = None  # the input of the computed part
        self.rows: Optional[torch.Tensor] = None        # rows computing on a per-clip step
        self.sub: Optional[torch.Tensor] = None         # their hidden states between blocks
        # EasyCache: per sample, the output (its last N tokens) and input at its last computed
        # step, and the local per-row sums [rows, B, 3] |out|, |out - out before|, |in - in
        # before| between its last two computed steps (``rated``: whether it has two)
        self.out_last: Optional[torch.Tensor] = None
        self.in_last: Optional[torch.Tensor] = None
        self.rate_sums: Optional[torch.Tensor] = None
        self.rated: List[bool] = []
        self.seen: List[bool] = []
        self.grid: Optional[TokenGrid] = None
        self.tracks_rates = False

    def holds_state(self) -> bool:
        return (self.reference is not None or self.states is not None
                or self.residual.shape is not None or self.per_group is not None
                or self.out_last is not None)

    def start(self, x: torch.Tensor) -> None:
        """A run's first step: who decides with whom."""
        self.groups = decision_groups(x)

    def refine(self, x: torch.Tensor) -> None:
        """The run's second step: rows that started alike but no longer are (clips sampled from
        the same noise with other captions: the first step moved them apart) decide apart; a
        clip's guidance copies stay identical at every step. Called before the first decision
        that compares anything; a split group's policy state is copied to its parts (its rows
        were alike until now), SpeCa's per-group forecasts start again."""
        new, parent = [], []
        for g, rows in enumerate(self.groups):
            parts = [rows] if len(rows) == 1 else \
                [[rows[j] for j in sub] for sub in decision_groups(x[rows])]
            new += parts
            parent += [g] * len(parts)
        if len(new) == len(self.groups):
            return
        order = sorted(range(len(new)), key=lambda k: new[k][0])
        if self.states is not None:
            self.states = [copy.deepcopy(self.states[parent[k]]) for k in order]
        for pair in self.per_group or ():
            for feature in pair:
                feature.clear()
        self.per_group = None
        self.groups = [new[k] for k in order]

    def end_step(self) -> None:
        self.trunk_in = self.residual_in = self.rows = self.sub = None

    def decide(self, policy, layout, block, x, bound, step, num_steps, grid, group,
               counts, state=None, at: float = 0.0) -> Optional[Tuple[int, ...]]:
        """Measure every group's change (one all_gather at most) and let the policy decide per
        group: None when every clip computes the rest of the trunk, else the batch rows that
        do (empty: every clip takes its stored residual). ``at``: the step's forecast
        position (SpeCa)."""
        measure = policy.measure
        now = MEASURES[measure](layout, block, x, bound, self.trunk_in)
        ref, groups = self.reference, self.groups
        self.grid, self.tracks_rates = grid, measure == "trunk_input"
        if self.states is None or len(self.states) != len(groups):
            self.states = [policy.new_state() for _ in groups]
        changes: List[Optional[float]] = [None] * len(groups)
        if measure == "trunk_input":
            if ref is not None and ref.shape == now.shape and self.residual.shape is not None:
                changes = self._predicted_changes(now, ref, grid, group)
        elif measure == "first_pair_forecast":
            changes = self._forecast_errors(policy, now, grid, group, at)
        elif now is not None and ref is not None and ref.shape == now.shape \
                and self.residual.shape is not None:
            changes = relative_l1(now, ref, grid, group, groups)
        flags = [bool(policy.decide(step, num_steps, c, s)) for c, s in zip(changes, self.states)]
        counts.changes.append(changes)
        counts.group_labels.append([str(policy.label(f, c, s)) for f, c, s in
                                    zip(flags, changes, self.states)])
        rows = group_rows(groups, flags)
        if measure == "first_pair_forecast":  # the computed clips' first-pair residual
            for (first, _), members, f in zip(self.per_group, groups, flags):
                if f:
                    first.update(now[members], at)
        elif now is None:
            pass
        elif policy.reference_every_step or all(flags) or ref is None or ref.shape != now.shape:
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

    # ------------------------------------------------------------ EasyCache
    def _predicted_changes(self, now, ref, grid, group) -> List[Optional[float]]:
        """EasyCache, per group: ``k * sum |x - x before| / sum |out|`` with the
        transformation rate ``k = sum |out - out before| / sum |x - x before|`` between its
        last two computed steps and ``out`` the output at the last one (None: no rate yet).
        The step's input change and the stored sums travel in one all_gather."""
        b = now.shape[0]
        if self.rate_sums is None or len(self.rated) != b:
            return [None] * len(self.groups)
        change = torch.stack([row_sums(now[i:i + 1] - ref[i:i + 1], grid) for i in range(b)], 1)
        parts = torch.cat([change[..., None], self.rate_sums], -1)   # [local rows, B, 4]
        sums = group_totals(gathered_totals(parts, grid, group), self.groups)
        out = []
        for members, (dx, norm, dout, dx_rate) in zip(self.groups, sums):
            ok = all(self.rated[i] for i in members) and norm > 0 and dx_rate > 0
            out.append(dout / dx_rate * dx / norm if ok else None)
        return out

    def _note_rates(self, out: torch.Tensor, rows: Optional[List[int]]) -> None:
        """EasyCache, at the end of a step: the computed samples' (``rows``; None: all) output
        and input are kept, with their local sums against the previous computed ones."""
        xin, grid = self.trunk_in, self.grid
        n = xin.shape[1]
        o = out[:, -n:]  # the output's last n tokens: the image tokens of an MMDiT's state
        b = o.shape[0]
        if self.out_last is None or self.out_last.shape != o.shape:
            self.out_last = torch.zeros_like(o)
            self.in_last = torch.zeros_like(xin)
            self.rate_sums = torch.zeros(grid.local_rows, b, 3, dtype=torch.float64,
                                         device=o.device)
            self.rated, self.seen = [False] * b, [False] * b
        for i in range(b) if rows is None else rows:
            oi, xi = o[i:i + 1], xin[i:i + 1]
            if self.seen[i]:
                self.rate_sums[:, i, 1] = row_sums(oi - self.out_last[i:i + 1], grid)
                self.rate_sums[:, i, 2] = row_sums(xi - self.in_last[i:i + 1], grid)
                self.rated[i] = True
            self.rate_sums[:, i, 0] = row_sums(oi, grid)
            self.out_last[i].copy_(oi[0])
            self.in_last[i].copy_(xi[0])
            self.seen[i] = True

    # ------------------------------------------------------------ SpeCa
    def _forecast_errors(self, policy, now, grid, group, at) -> List[Optional[float]]:
        """SpeCa, per group: sum |forecast - now| / sum |now| of the first blocks' residual
        against its forecast from the group's computed steps (None: nothing stored yet)."""
        if self.per_group is None or len(self.per_group) != len(self.groups):
            fc, like = policy.forecast, self.residual
            self.per_group = [tuple(Feature(like.codec, like.counter, fc["order"],
                                            fc.get("method", "taylor"), fc.get("corrector"))
                                    for _ in range(2)) for _ in self.groups]
        if any(first.shape is None or tuple(first.shape)[1:] != tuple(now.shape)[1:]
               or rest.shape is None for first, rest in self.per_group):
            return [None] * len(self.groups)
        fc = torch.empty_like(now)
        for (first, _), members in zip(self.per_group, self.groups):
            fc[members] = first.value(at, now.dtype)
        return relative_l1(fc, now, grid, group, self.groups)

    def _stored_residual(self, x: torch.Tensor, at: float) -> torch.Tensor:
        if self.per_group is None:
            return self.residual.value(at, x.dtype)
        r = torch.empty_like(x)  # each group's forecast of its residual
        for (_, rest), members in zip(self.per_group, self.groups):
            r[members] = rest.value(at, x.dtype)
        return r

    def _store_rows(self, rows: List[int], residual: torch.Tensor, at: float) -> None:
        """SpeCa: the groups whose rows (all of them, in order ``rows``) computed store their
        residual (a new anchor of its forecast)."""
        pos = {r: k for k, r in enumerate(rows)}
        for (_, rest), members in zip(self.per_group, self.groups):
            if members[0] in pos:
                rest.update(residual[[pos[r] for r in members]], at)

    # ------------------------------------------------------------ outputs
    def residual_output(self, x: torch.Tensor, at: float) -> torch.Tensor:
        """Last block of a skipped step: its input (the input at the decision point, passed
        through) plus the stored (SpeCa: forecast) residual."""
        return x + self._stored_residual(x, at)

    def mixed_output(self, x: torch.Tensor, sub: torch.Tensor, at: float) -> torch.Tensor:
        """Last block of a step decided per clip: the rows that computed the trunk take ``sub``
        (their sub-batch output) and store their new residual; the others take their input
        (passed through from the decision point) plus their stored residual."""
        rows, self.sub = self.rows, None
        out = self.residual_output(x, at).index_copy_(0, rows, sub)
        if self.per_group is not None:
            self._store_rows(rows.tolist(), sub - x.index_select(0, rows), at)
        else:
            self.residual.write_rows_(rows, sub - x.index_select(0, rows))
        if self.tracks_rates:
            self._note_rates(out, rows.tolist())
        return out

    def after_last_block(self, out: torch.Tensor, at: float) -> None:
        if self.residual_in is not None:
            if self.per_group is not None:
                self._store_rows(list(range(out.shape[0])), out - self.residual_in, at)
            else:
                self.residual.update(out - self.residual_in, at)
            if self.tracks_rates:
                self._note_rates(out, None)
        self.end_step()
