"""The base of every cache policy: what a policy answers (the plan of a step, which kinds it can
reuse, whether it skips the trunk), the defaults of the settings a policy may not have, the
generic validation of its fields and ``describe()``."""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, ClassVar, Optional, Sequence

from ..plan import Kind, StepPlan
from .fields import validate_fields
from .scorers import Scorer


def _json_ready(v: Any) -> Any:
    """Enums -> their values, tuples -> lists, recursively (for describe())."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {_json_ready(k): _json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_ready(x) for x in v]
    return v


class CachePolicy:
    """Base of every policy. Registered policies are frozen dataclasses whose fields declare
    their checks (:mod:`.fields`); ``__post_init__`` runs them, then the policy's cross-field
    checks (:meth:`_check_together`). The class attributes here are the defaults of the
    settings a policy may not have (no scorer: no token subsets; no stored dtype: features
    stored in the model's dtype)."""

    name: ClassVar[str] = "base"
    scorer: Optional[Scorer] = None
    stored_dtype: Optional[str] = None
    cfg_shared_selection: bool = False
    staleness_bonus: float = 0.0
    seed: int = 0
    warmup_steps: int = 0

    def __post_init__(self):
        validate_fields(self)
        self._check_together()

    def _check_together(self) -> None:
        """Checks that read several fields (after each field's own check); none by default."""

    @property
    def forecast_order(self) -> int:
        """0: a reused feature is its last computed value; k: a Taylor forecast of order k."""
        return 0

    @property
    def forecast_distance(self) -> str:
        """The variable of the forecast: the step index ("step") or the timestep."""
        return "step"

    @property
    def forecast_method(self) -> str:
        """"taylor" (finite differences) or "bdf2" (three anchors, :mod:`..state`)."""
        return "taylor"

    @property
    def forecast_corrector(self) -> Optional[str]:
        """None, or "heun" (bdf2's corrected read-out)."""
        return None

    @property
    def couples_cfg_halves(self) -> bool:
        """Whether the conditional and unconditional halves of the CFG batch depend on each
        other (a token selection shared by both; adaptive policies decide per CFG pair), so
        the two halves cannot run on separate ranks (``cfg_parallel=2``)."""
        return bool(self.cfg_shared_selection)

    def plan(self, step: int, num_steps: Optional[int], timesteps: Sequence[float]) -> StepPlan:
        """The plan of step ``step`` (0-based) of a run of ``num_steps`` (None when unknown);
        ``timesteps`` are the run's timesteps up to and including this step's."""
        raise NotImplementedError

    def reuses(self, kind: Kind) -> bool:
        """Whether any plan of this policy can reuse or partially recompute ``kind``."""
        return False

    def skips_trunk_at(self, step: int, num_steps: Optional[int],
                       timesteps: Sequence[float] = ()) -> bool:
        """Whether step ``step`` skips the trunk. The manager asks it one step ahead (to know
        whether to store the trunk output), when that step's timestep is not known yet:
        ``timesteps`` then repeats the current one. Fixed plans know it from the index alone."""
        return self.skips_trunk() and self.plan(step, num_steps, timesteps).skip_trunk

    def skips_trunk(self) -> bool:
        """Whether any step of any run skips the trunk."""
        return False

    def ratio_factor(self, step: int, num_steps: Optional[int], layer: int, depth: int) -> float:
        """Per-block multiplier of a PARTIAL module's ratio (1 unless a schedule says so)."""
        return 1.0

    @property
    def min_steps(self) -> int:
        return max(1, self.warmup_steps)

    def validate_run(self, num_steps: int) -> None:
        if num_steps < self.min_steps:
            raise ValueError(f"cache policy {self.name!r} needs at least {self.min_steps} "
                             f"sampling steps; the run has num_steps={num_steps}")

    def describe(self) -> dict:
        """``{"type": name, **settings}`` with plain values (JSON-ready)."""
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"type": self.name, **_json_ready(fields)}


class Forecasting:
    """Mixin of the policies with a ``forecast`` field (:func:`.fields.forecast_field`)."""

    @property
    def forecast_order(self) -> int:
        return self.forecast["order"]

    @property
    def forecast_distance(self) -> str:
        return self.forecast["distance"]

    @property
    def forecast_method(self) -> str:
        return self.forecast.get("method", "taylor")

    @property
    def forecast_corrector(self) -> Optional[str]:
        return self.forecast.get("corrector")


def accepted_keys(cls) -> list:
    """The keyword arguments a registered policy class accepts (its dataclass fields)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cache policy class {cls.__name__} is not a dataclass; registered "
                        f"policies must be frozen dataclasses")
    return [f.name for f in dataclasses.fields(cls) if f.init]


__all__ = ["CachePolicy", "Forecasting", "accepted_keys"]
