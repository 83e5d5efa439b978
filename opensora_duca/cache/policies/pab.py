"""Pyramid attention broadcast (PAB)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

from ...registry import CACHES
from ..plan import FULL_STEP, Action, Kind, StepKind, StepPlan
from .base import CachePolicy
from .fields import int_field, range_field, stored_dtype_field


@CACHES.register_module("PAB")
@dataclass(frozen=True)
class PAB(CachePolicy):
    """Pyramid attention broadcast: inside the timestep window (lo, hi), spatial self-attention,
    temporal self-attention and cross-attention are computed once every ``spatial_range``,
    ``temporal_range`` and ``cross_range`` steps (counted from the run's first step in the
    window) and broadcast (reused) in between; MLPs always run. Open-Sora defaults 2 / 4 / 6 in
    (450, 930)."""

    name: ClassVar[str] = "PAB"
    spatial_range: int = int_field(2, lo=1)
    temporal_range: int = int_field(4, lo=1)
    cross_range: int = int_field(6, lo=1)
    timestep_window: Tuple[float, float] = range_field((450.0, 930.0), strict=True)
    stored_dtype: Optional[str] = stored_dtype_field()

    @property
    def ranges(self) -> Dict[Kind, int]:
        return {Kind.SPATIAL_ATTN: self.spatial_range, Kind.TEMPORAL_ATTN: self.temporal_range,
                Kind.CROSS_ATTN: self.cross_range}

    def _in_window(self, t: float) -> bool:
        lo, hi = self.timestep_window
        return lo < t < hi

    def plan(self, step, num_steps, timesteps):
        if not self._in_window(timesteps[step]):
            return FULL_STEP
        first = next(i for i, t in enumerate(timesteps[:step + 1]) if self._in_window(t))
        j = step - first
        actions = {k: (Action.FULL if j % r == 0 else Action.REUSE)
                   for k, r in self.ranges.items()}
        actions[Kind.MLP] = Action.FULL
        label = (StepKind.FULL if all(a == Action.FULL for a in actions.values())
                 else StepKind.BROADCAST)
        return StepPlan(actions=actions, label=label)

    def reuses(self, kind):
        return kind != Kind.MLP and self.ranges[kind] > 1


__all__ = ["PAB"]
