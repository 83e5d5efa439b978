"""What a policy says for one denoising step: per module kind, full / reuse / partial, or skip
the whole trunk (aggressive caching). Module kinds, actions and step kinds are string enums, so
they compare equal to (and serialise as) their plain names."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, Mapping, Optional, Tuple


class _Name(str, Enum):
    """A string enum whose str() and format() give the plain value ("mlp", not "Kind.MLP")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def names(cls) -> list:
        return [m.value for m in cls]


class Kind(_Name):
    """The cached module kinds of a spatial/temporal block pair."""

    SPATIAL_ATTN = "spatial_attn"
    TEMPORAL_ATTN = "temporal_attn"
    CROSS_ATTN = "cross_attn"
    MLP = "mlp"


class Action(_Name):
    """What a module does at a step: compute and store, reuse the stored value, or recompute a
    token subset into the stored value."""

    FULL = "full"
    REUSE = "reuse"
    PARTIAL = "partial"


class StepKind(_Name):
    """Label of a step in statistics and reports."""

    FULL = "full"
    CROSS_REUSED = "full (cross-attn reused)"
    CONSERVATIVE = "conservative"
    AGGRESSIVE = "aggressive"
    REUSE = "reuse"
    FORECAST = "forecast"
    BROADCAST = "broadcast"
    RESIDUAL = "residual reused"  # adaptive: the rest of the trunk replaced by its residual
    MIXED = "residual reused for some samples"  # adaptive, per sample: the others computed
    VERIFIED = "forecast (verified)"  # SpeCa, per clip: the check passed, the residual forecast
    REJECTED = "full (forecast rejected)"  # SpeCa, per clip: the check failed, computed
    AGGRESSIVE_MIXED = "aggressive (some clips computed)"  # VerifiedDuCa: failed checks
    CHECK_PASSED = "conservative (check passed)"  # VerifiedDuCa, per clip
    CHECK_FAILED = "conservative (check failed)"  # VerifiedDuCa: its next aggressive computes


KINDS = tuple(Kind)

# what an adaptive policy may compare between steps (its ``measure``): the deciding block's
# timestep-modulated, normalised input; what the blocks before the deciding one added to the
# trunk input; the trunk input itself (EasyCache's transformation rate); what the blocks before
# the deciding one added, against its forecast (SpeCa's check); nothing (MagCache: a calibrated
# curve decides). cache/adaptive.py holds the function of each name.
MEASURES = ("modulated_input", "first_pair_residual", "trunk_input", "first_pair_forecast",
            "none")


@dataclass(frozen=True)
class StepPlan:
    """``actions[kind]`` is an :class:`Action`; ``ratios[kind]`` the fraction of tokens a
    PARTIAL module recomputes; ``skip_trunk`` replaces the whole trunk by its stored output;
    ``label`` names the step kind in statistics.

    Adaptive policies: ``decide_at`` is the block (index in call order: spatial 0, temporal 0,
    spatial 1, ...) before which the policy decides from a measured change whether to compute
    the rest of the trunk; ``residual_from`` (the decision "skip") passes the blocks from that
    index on and adds the stored residual of those blocks to their input; with
    ``computed_rows`` (decisions per sample) the batch rows listed there compute those blocks
    (on a sub-batch) and only the other rows take the stored residual, or, with
    ``others_from_trunk`` (VerifiedDuCa's aggressive step with clips falling back), the stored
    (forecast) trunk output."""

    actions: Mapping[Kind, Action] = field(default_factory=lambda: {k: Action.FULL for k in Kind})
    ratios: Mapping[Kind, float] = field(default_factory=dict)
    skip_trunk: bool = False
    label: str = StepKind.FULL
    decide_at: Optional[int] = None
    residual_from: Optional[int] = None
    computed_rows: Tuple[int, ...] = ()
    others_from_trunk: bool = False

    def __post_init__(self):
        acts: Dict[Kind, Action] = {Kind(k): Action(a) for k, a in self.actions.items()}
        if set(acts) != set(Kind):
            raise ValueError(f"StepPlan actions={dict(self.actions)!r}: needs one action for "
                             f"each kind {Kind.names()}")
        ratios = {Kind(k): float(r) for k, r in self.ratios.items()}
        for k, a in acts.items():
            if a == Action.PARTIAL and not 0.0 <= ratios.get(k, -1.0) <= 1.0:
                raise ValueError(f"StepPlan: {k} is partial and needs a ratio in [0, 1], got "
                                 f"{self.ratios.get(k)!r}")
        object.__setattr__(self, "actions", acts)
        object.__setattr__(self, "ratios", ratios)

    def is_full(self) -> bool:
        return (not self.skip_trunk and self.residual_from is None
                and all(a == Action.FULL for a in self.actions.values()))


FULL_STEP = StepPlan()
TRUNK_SKIP = StepPlan(actions={k: Action.REUSE for k in Kind}, skip_trunk=True,
                      label=StepKind.AGGRESSIVE)
