"""Interval policies: the trunk is computed every ``interval`` steps after ``warmup_steps`` full
steps and cached in between. FORA reuses (or, with ``forecast=``, forecasts) every module's
output; TaylorSeer is FORA that always forecasts (its ``order`` and ``distance`` are FORA's
``forecast``); TrunkReuse replaces the whole trunk by its stored output."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Tuple

from ...registry import CACHES
from ..plan import FULL_STEP, TRUNK_SKIP, Action, Kind, StepKind, StepPlan
from .base import CachePolicy, Forecasting
from .fields import (
    DISTANCES,
    MAX_ORDER,
    choice_field,
    error,
    forecast_field,
    int_field,
    stored_dtype_field,
)


class IntervalPolicy(CachePolicy):
    """Full every ``interval`` steps after ``warmup_steps`` full steps (or at the steps of an
    explicit ``schedule``); in between every module's output is reused (forecast order 0) or
    forecast (order k >= 1)."""

    interval: int
    warmup_steps: int
    schedule: Optional[Tuple[int, ...]] = None
    schedule_steps: Optional[int] = None

    def scheduled(self, num_steps: Optional[int]) -> Tuple[int, ...]:
        """The computed steps of a run of ``num_steps``: ``schedule`` as given, or, when it was
        written for ``schedule_steps`` steps and the run has another number, each index s
        mapped to round(s * num_steps / schedule_steps) (duplicates merged)."""
        sched = self.schedule
        if self.schedule_steps is None or num_steps is None or num_steps == self.schedule_steps:
            return sched
        return tuple(sorted({round(s * num_steps / self.schedule_steps) for s in sched}))

    def computes(self, step: int, num_steps: Optional[int] = None) -> bool:
        if self.schedule is not None:
            return step in self.scheduled(num_steps)
        return step < self.warmup_steps or (step - self.warmup_steps) % self.interval == 0

    def validate_run(self, num_steps: int) -> None:
        super().validate_run(num_steps)
        if self.schedule is not None and self.schedule_steps is None \
                and self.schedule[-1] >= num_steps:
            raise error(self.name, "schedule", list(self.schedule),
                        f"step indices below the run's num_steps={num_steps} (or "
                        f"schedule_steps=N: the schedule written for N steps, scaled to the run)")

    def plan(self, step, num_steps, timesteps):
        if self.computes(step, num_steps):
            return FULL_STEP
        label = StepKind.FORECAST if self.forecast_order else StepKind.REUSE
        return StepPlan(actions={k: Action.REUSE for k in Kind}, label=label)

    def reuses(self, kind):
        return self.interval > 1


@dataclass(frozen=True)
class _IntervalWithForecast(Forecasting, IntervalPolicy):
    """The fields of FORA and TrunkReuse (``forecast=dict(order=k)`` forecasts what they
    cache)."""

    interval: int = int_field(2, lo=1)
    warmup_steps: int = int_field(0)
    stored_dtype: Optional[str] = stored_dtype_field()
    forecast: Mapping[str, Any] = forecast_field()
    schedule: Optional[Tuple[int, ...]] = None
    schedule_steps: Optional[int] = None

    def _check_together(self) -> None:
        super()._check_together()
        sched, n = self.schedule, self.schedule_steps
        if sched is not None:
            ok = (isinstance(sched, (list, tuple)) and len(sched) >= 1
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in sched)
                  and sched[0] == 0 and all(b > a for a, b in zip(sched, sched[1:])))
            if not ok:
                raise error(self.name, "schedule", sched, "None or a list of strictly "
                            "increasing step indices starting at 0 (the computed steps)")
            for key in ("interval", "warmup_steps"):
                default = next(f.default for f in dataclasses.fields(self) if f.name == key)
                if getattr(self, key) != default:
                    raise error(self.name, key, getattr(self, key),
                                f"its default ({default}) when 'schedule' is set (the "
                                f"schedule names every computed step)")
            object.__setattr__(self, "schedule", tuple(sched))
        if n is not None and (sched is None or isinstance(n, bool) or not isinstance(n, int)
                              or n <= sched[-1]):
            raise error(self.name, "schedule_steps", n, "None, or with 'schedule' an int above "
                        "its last index (the run length the schedule was written for)")

    def reuses(self, kind):
        return self.schedule is not None or self.interval > 1


@CACHES.register_module("FORA")
@dataclass(frozen=True)
class FORA(_IntervalWithForecast):
    """FORA: every block's self-attention, cross-attention and MLP outputs are computed every
    ``interval`` steps (default 3, after ``warmup_steps`` full steps) and reused (or forecast)
    in between. ``schedule=[0, s1, s2, ...]`` names the computed steps instead (increasing,
    from 0; every index below the run's number of steps; interval and warmup_steps left at
    their defaults); with ``schedule_steps=N`` the schedule was written for N steps and a run
    of n steps computes the steps round(s * n / N)."""

    name: ClassVar[str] = "FORA"
    interval: int = int_field(3, lo=1)


@CACHES.register_module("TrunkReuse")
@dataclass(frozen=True)
class TrunkReuse(_IntervalWithForecast):
    """Aggressive-only caching: the trunk is computed every ``interval`` steps (default 2, after
    ``warmup_steps`` full steps; or at the steps of ``schedule``, as FORA's) and its stored
    output replaces it in between."""

    name: ClassVar[str] = "TrunkReuse"

    def plan(self, step, num_steps, timesteps):
        return TRUNK_SKIP if self.skips_trunk_at(step, num_steps) else FULL_STEP

    def reuses(self, kind):
        return False  # no module is reused on its own: the whole trunk is

    def skips_trunk_at(self, step, num_steps, timesteps=()):
        return not self.computes(step, num_steps)

    def skips_trunk(self):
        return self.schedule is not None or self.interval > 1


@CACHES.register_module("TaylorSeer")
@dataclass(frozen=True)
class TaylorSeer(IntervalPolicy):
    """TaylorSeer (Liu et al. 2025): every block's self-attention, cross-attention and MLP are
    computed every ``interval`` steps after ``warmup_steps`` full steps and forecast in between
    by a Taylor polynomial of order ``order`` in the step distance (``distance="timestep"``:
    in the timestep). Defaults: the reference code's default mode (interval 5, order 2,
    3 full first steps). The same plan as ``FORA(interval, warmup_steps,
    forecast=dict(order=order, distance=distance))``."""

    name: ClassVar[str] = "TaylorSeer"
    interval: int = int_field(5, lo=1)
    order: int = int_field(2, lo=0, hi=MAX_ORDER)
    warmup_steps: int = int_field(3)
    distance: str = choice_field("step", DISTANCES)
    stored_dtype: Optional[str] = stored_dtype_field()

    @property
    def forecast_order(self) -> int:
        return self.order

    @property
    def forecast_distance(self) -> str:
        return self.distance


__all__ = ["IntervalPolicy", "FORA", "TrunkReuse", "TaylorSeer"]
