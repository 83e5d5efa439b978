"""DuCa (dual feature caching) and ToCa (token-wise caching): per module kind, a cycle table of
full / conservative / aggressive entries after the warmup steps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from ...registry import CACHES
from ..plan import FULL_STEP, TRUNK_SKIP, Action, Kind, StepKind, StepPlan, _Name
from .base import CachePolicy, Forecasting
from .fields import (
    bool_field,
    check_choice,
    check_forecast,
    check_int,
    check_kind_map,
    check_number,
    checked,
    choice_field,
    error,
    final_step_field,
    forecast_field,
    int_field,
    number_field,
    stored_dtype_field,
)
from .scorers import Scorer


class Entry(_Name):
    """An entry of a DuCa/ToCa cycle table."""

    FULL = "full"
    CONSERVATIVE = "conservative"
    AGGRESSIVE = "aggressive"


RATIO_SCHEDULES = {"constant": {}, "linear": {"start": 1.0, "end": 1.0}, "exp": {"decay": 1.0},
                   "layerwise": {"first": 1.0, "last": 1.0}}
_DUCA_CYCLES = {Kind.SPATIAL_ATTN: 3, Kind.TEMPORAL_ATTN: 3, Kind.CROSS_ATTN: 6, Kind.MLP: 3}
_RATIO_FACTORS = {Kind.MLP: 1.495, Kind.CROSS_ATTN: 1.0}
_PARTIAL_KINDS = (Kind.MLP, Kind.CROSS_ATTN)


# ------------------------------------------------------------------ field checks
def _check_cycles(pol, key, value) -> Dict[Kind, int]:
    cycles = dict(_DUCA_CYCLES)
    cycles.update(check_kind_map(pol.name, key, value,
                                 lambda k, v: check_int(pol.name, k, v, 1)))
    return cycles


def _check_tables(pol, key, value) -> Dict[Kind, Tuple[Entry, ...]]:
    """One table of ``cycles[kind]`` entries per kind (the cycles are checked first); the
    entries a policy allows and its default table come from the policy class."""
    given = check_kind_map(pol.name, key, value, lambda k, v: v)
    allowed = [a.value for a in pol._allowed_entries()]
    tables = {}
    for k in Kind:
        c = pol.cycles[k]
        table = given.get(k, [pol._default_entry(p) for p in range(c)])
        ok = (isinstance(table, (list, tuple)) and len(table) == c
              and all(e in allowed for e in table))
        if not ok:
            raise error(pol.name, f"{key}.{k}", table, f"a list of {c} (cycles.{k}) entries "
                        f"among {allowed}")
        tables[k] = tuple(Entry(e) for e in table)
    return tables


def _check_ratio_factors(pol, key, value) -> Dict[Kind, float]:
    factors = dict(_RATIO_FACTORS)
    for k, v in check_kind_map(pol.name, key, value,
                               lambda k, v: check_number(pol.name, k, v)).items():
        if k not in _PARTIAL_KINDS:
            raise error(pol.name, f"{key}.{k}", v, f"keys {[str(x) for x in _PARTIAL_KINDS]}")
        factors[k] = v
    return factors


def _check_schedule(pol, key, cfg) -> dict:
    n = pol.name
    if not isinstance(cfg, Mapping):
        raise error(n, key, cfg, "a dict(type=..., ...)")
    cfg = dict(cfg)
    typ = check_choice(n, f"{key}.type", cfg.pop("type", "constant"), tuple(RATIO_SCHEDULES))
    allowed = RATIO_SCHEDULES[typ]
    for k, v in cfg.items():
        if k not in allowed:
            raise error(n, f"{key}.{k}", v, f"keys {sorted(allowed)} for type {typ!r}")
        check_number(n, f"{key}.{k}", v)
    return {"type": typ, **{k: float(v) for k, v in {**allowed, **cfg}.items()}}


@CACHES.register_module("DuCa")
@dataclass(frozen=True)
class DuCa(Forecasting, CachePolicy):
    """Dual feature caching (DuCa). Defaults reproduce the released Open-Sora preset.

    Args:
        warmup_steps: steps 0..warmup_steps-1 are fully computed (default 3).
        cycles: cycle length per module kind (spatial_attn 3, temporal_attn 3, cross_attn 6,
            mlp 3; keys given override these). For step s >= warmup_steps the entry
            ``tables[kind][s % cycle]`` applies.
        tables: per kind, a list of ``cycle`` entries among full / conservative / aggressive.
            Default: position 0 full, every position p with p % 3 == 2 aggressive, the others
            conservative (the released tables F C A and F C A C C A).
        fresh_ratio: base fraction of tokens a conservative MLP recomputes (0.1).
        ratio_factors: per-kind multipliers of fresh_ratio (mlp 1.495, cross_attn 1.0).
        ratio_schedule: dict(type=constant | linear(start, end) | exp(decay) |
            layerwise(first, last)); the factor is clipped so the ratio stays in [0, 1].
        scorer: vnorm | random | attention | similarity | norm (default vnorm).
        staleness_bonus: lambda of score += lambda * (steps since recomputed) / 3 (0.25).
        cfg_shared_selection: one token selection shared by the conditional and unconditional
            halves of the CFG batch (False: each sample selects its own, as the released code).
        stored_dtype: None (model dtype) | fp32 | fp16 | bf16 | fp8 (float8_e4m3fn, one scale
            per token) | int8 (symmetric integers, one scale per token).
        final_step: "plan" (follow the cycle, as released) or "full" (compute the last step).
        seed: seed of the random scorer.
        forecast: dict(order=0|1|2, distance="step"|"timestep"): order 0 reuses stored
            outputs (the released method); order k forecasts every reused module output and the
            skipped trunk's output by a Taylor polynomial of its last k finite differences.
    What the entries do: full computes a module and stores it; conservative reuses self- and
    cross-attention outputs and recomputes a token subset of the MLP; aggressive skips the
    whole trunk when every kind is aggressive at that step (otherwise the module is reused).
    """

    name: ClassVar[str] = "DuCa"
    warmup_steps: int = int_field(3)
    cycles: Mapping[Kind, int] = checked(_check_cycles, default_factory=dict)
    tables: Mapping[Kind, Tuple[Entry, ...]] = checked(_check_tables, default_factory=dict)
    fresh_ratio: float = number_field(0.1, 0.0, 1.0)
    ratio_factors: Mapping[Kind, float] = checked(_check_ratio_factors, default_factory=dict)
    ratio_schedule: Mapping[str, Any] = checked(_check_schedule,
                                                default_factory=lambda: {"type": "constant"})
    scorer: Scorer = choice_field(Scorer.VNORM, Scorer)
    staleness_bonus: float = number_field(0.25)
    cfg_shared_selection: bool = bool_field(False)
    stored_dtype: Optional[str] = stored_dtype_field()
    final_step: str = final_step_field("plan")
    seed: int = int_field(0)
    forecast: Mapping[str, Any] = forecast_field()

    def _default_entry(self, p: int) -> Entry:
        if p == 0:
            return Entry.FULL
        return Entry.AGGRESSIVE if p % 3 == 2 else Entry.CONSERVATIVE

    def _check_together(self) -> None:
        super()._check_together()
        if self.warmup_steps == 0:  # step 0 has nothing stored to reuse: it must be full
            first = {str(k): self.tables[k][0].value for k in Kind
                     if self.tables[k][0] != Entry.FULL}
            if first:
                raise error(self.name, "warmup_steps", 0,
                            f"an int >= 1, or tables whose first entries are all 'full' (step "
                            f"0 has nothing stored to reuse; first entries {first})")

    def _allowed_entries(self) -> tuple:
        return tuple(Entry)

    # ---------------------------------------------------------------- plans
    def _entries(self, step: int) -> Dict[Kind, Entry]:
        return {k: self.tables[k][step % self.cycles[k]] for k in Kind}

    def _computes_all(self, step: int, num_steps: Optional[int]) -> bool:
        return step < self.warmup_steps or (self.final_step == "full" and num_steps is not None
                                            and step == num_steps - 1)

    def _conservative(self, kind: Kind) -> Action:
        return Action.PARTIAL if kind == Kind.MLP else Action.REUSE

    def _schedule_factor(self, step: int, num_steps: Optional[int]) -> float:
        s = self.ratio_schedule
        if s["type"] == "linear":
            frac = step / max((num_steps or step + 1) - 1, 1)
            return s["start"] + (s["end"] - s["start"]) * frac
        if s["type"] == "exp":
            try:  # a growing schedule saturates (the ratio is capped at 1) instead of failing
                return s["decay"] ** step
            except OverflowError:
                return math.inf
        return 1.0

    def ratio_factor(self, step, num_steps, layer, depth):
        s = self.ratio_schedule
        if s["type"] != "layerwise":
            return 1.0
        return s["first"] + (s["last"] - s["first"]) * (layer / max(depth - 1, 1))

    def skips_trunk_at(self, step, num_steps, timesteps=()):
        return (not self._computes_all(step, num_steps)
                and all(e == Entry.AGGRESSIVE for e in self._entries(step).values()))

    def plan(self, step, num_steps, timesteps):
        if self._computes_all(step, num_steps):
            return FULL_STEP
        if self.skips_trunk_at(step, num_steps):
            return TRUNK_SKIP
        actions, ratios = {}, {}
        for k, e in self._entries(step).items():
            if e == Entry.FULL:
                actions[k] = Action.FULL
            elif e == Entry.CONSERVATIVE:
                actions[k] = self._conservative(k)
                if actions[k] == Action.PARTIAL:
                    ratios[k] = min(1.0, self.fresh_ratio * self.ratio_factors[k]
                                    * self._schedule_factor(step, num_steps))
            else:  # aggressive entry on a step that still computes the trunk: reuse the module
                actions[k] = Action.REUSE
        if all(a == Action.FULL for a in actions.values()):
            label = StepKind.FULL
        elif all(actions[k] == Action.FULL for k in (Kind.SPATIAL_ATTN, Kind.TEMPORAL_ATTN,
                                                     Kind.MLP)):
            label = StepKind.CROSS_REUSED
        else:
            label = StepKind.CONSERVATIVE
        return StepPlan(actions=actions, ratios=ratios, label=label)

    def reuses(self, kind):
        return any(e != Entry.FULL for e in self.tables[kind])

    def skips_trunk(self):
        # the entries repeat with the lcm of the cycles, and every residue occurs after warmup
        period = math.lcm(*self.cycles.values())
        return any(all(self.tables[k][s % self.cycles[k]] == Entry.AGGRESSIVE for k in Kind)
                   for s in range(period))


@CACHES.register_module("ToCa")
@dataclass(frozen=True)
class ToCa(DuCa):
    """Token-wise caching (ToCa) in the same harness: the DuCa preset with a conservative step
    wherever DuCa has an aggressive one (all other fields as DuCa). ToCa's own attention-map
    scorer is ``scorer="attention"`` (needs the ``math`` attention backend)."""

    name: ClassVar[str] = "ToCa"

    def _default_entry(self, p):
        return Entry.FULL if p == 0 else Entry.CONSERVATIVE

    def _allowed_entries(self):
        return (Entry.FULL, Entry.CONSERVATIVE)  # no aggressive steps: that is DuCa


def _order1_forecast() -> Any:
    return checked(lambda p, k, v: check_forecast(p.name, k, v),
                   default_factory=lambda: {"order": 1, "distance": "step"})


@CACHES.register_module("VerifiedDuCa")
@dataclass(frozen=True)
class VerifiedDuCa(DuCa):
    """DuCa with forecasting and a verified aggressive step (this project's DuCa variant).

    The same dual schedule as :class:`DuCa` (the same fields and tables), with three changes:

    - every reused module output and the skipped trunk's output are forecast (``forecast``,
      default first-order Taylor in the step index; bdf2 accepted) instead of reused;
    - the trunk's forecast is anchored at fully computed steps only (DuCa with ``forecast=``
      anchors it at every step that runs the trunk, conservative steps included, whose output
      is itself approximate);
    - the conservative step checks the forecast: the tokens its MLP recomputes (chosen by
      their value vectors, as DuCa's) are compared, in the first block that recomputes a token
      subset, with the MLP's forecast at the same tokens, relative L1 ``sum |forecast - exact|
      / sum |exact|`` over each clip's rows (its CFG copies; per-row float64 sums, one
      all_gather, the same on every rank and in any batch). A clip whose error reaches
      ``verify_threshold`` computes its next aggressive steps (the whole trunk, on its rows
      only) until the next full step; the other clips take the trunk's forecast. None: no
      check is computed (the plan alone decides; a huge threshold logs the errors in
      ``stats()["changes"]`` without ever failing).

    ``aggressive``: what an aggressive step does. "trunk" (default, as DuCa): the whole
    trunk is skipped and its output forecast. "modules": the trunk runs with every module's
    output forecast (no matrix product of a module is computed: FORA's forecast step), which
    keeps each block's own forecast instead of one for the whole trunk.

    ``stats()["verify"]`` counts the checks and the failed ones; ``group_labels`` name each
    clip's aggressive steps "aggressive" or "full (forecast rejected)".
    """

    name: ClassVar[str] = "VerifiedDuCa"
    forecast: Mapping[str, Any] = _order1_forecast()
    verify_threshold: Optional[float] = None
    aggressive: str = choice_field("trunk", ("trunk", "modules"))
    verifies_tokens: ClassVar[bool] = True

    def _check_together(self) -> None:
        super()._check_together()
        v = self.verify_threshold
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not v > 0 or v != v):
            raise error(self.name, "verify_threshold", v, "None or a number > 0")
        if self.forecast["order"] == 0 and self.forecast.get("method", "taylor") == "taylor":
            raise error(self.name, "forecast", dict(self.forecast),
                        "a forecast (order >= 1, or method='bdf2'): VerifiedDuCa forecasts")
        if self.forecast["distance"] != "step":
            raise error(self.name, "forecast.distance", self.forecast["distance"],
                        "'step' (the checks compare forecasts in the step index)")

    @property
    def couples_cfg_halves(self) -> bool:
        # a clip's CFG pair is checked, and falls back, together (no threshold: no check)
        return self.verify_threshold is not None or bool(self.cfg_shared_selection)

    def skips_trunk_at(self, step, num_steps, timesteps=()):
        return self.aggressive == "trunk" and super().skips_trunk_at(step, num_steps, timesteps)

    def skips_trunk(self):
        return self.aggressive == "trunk" and super().skips_trunk()

    def plan(self, step, num_steps, timesteps):
        if self.aggressive == "modules" and super().skips_trunk_at(step, num_steps):
            return StepPlan(actions={k: Action.REUSE for k in Kind}, label=StepKind.FORECAST)
        return super().plan(step, num_steps, timesteps)

    def is_aggressive(self, plan: StepPlan) -> bool:
        """Whether ``plan`` is one of this policy's aggressive steps (the checked fallback's)."""
        return plan.skip_trunk or (self.aggressive == "modules"
                                   and all(a == Action.REUSE for a in plan.actions.values()))


__all__ = ["DuCa", "ToCa", "VerifiedDuCa", "Entry", "RATIO_SCHEDULES"]
