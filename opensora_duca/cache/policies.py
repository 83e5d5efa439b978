"""Cache policies, registered in CACHES: ``none``, ``DuCa``, ``ToCa``, ``FORA``, ``PAB`` and
``TrunkReuse`` (aggressive-only), ``TaylorSeer`` (forecasting), and the adaptive ``TeaCache``
and ``FirstBlockCache``; ``forecast=`` adds forecasting to DuCa, ToCa, FORA and TrunkReuse.

Each policy's configuration is one frozen dataclass validated in ``__post_init__`` (so
``DuCa(fresh_ratio=0.2)`` and ``dict(type="DuCa", fresh_ratio=0.2)`` are the same thing, and a
bad value fails when the config is built). A policy maps a step index, the run's number of
steps and the timesteps seen so far in the run to a :class:`StepPlan`; it holds no run state,
so plans are deterministic and every sequence-parallel rank computes the same plan with no
communication.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

from ..registry import CACHES
from .plan import FULL_STEP, TRUNK_SKIP, Action, Kind, StepKind, StepPlan, _Name


class Scorer(_Name):
    """How a token-subset step ranks tokens (highest first)."""

    VNORM = "vnorm"            # sum over heads of (1 - ||v||), from the last full self-attention
    RANDOM = "random"          # uniform, drawn for the global token grid
    ATTENTION = "attention"    # attention received (needs the 'math' attention backend)
    SIMILARITY = "similarity"  # 1 - cosine(block input, block input at the last full MLP)
    NORM = "norm"              # L2 norm of the block input


class Entry(_Name):
    """An entry of a DuCa/ToCa cycle table."""

    FULL = "full"
    CONSERVATIVE = "conservative"
    AGGRESSIVE = "aggressive"


STORED_DTYPES = (None, "fp32", "fp16", "bf16", "fp8", "int8")
DISTANCES = ("step", "timestep")
MAX_ORDER = 2
RATIO_SCHEDULES = {"constant": {}, "linear": {"start": 1.0, "end": 1.0}, "exp": {"decay": 1.0},
                   "layerwise": {"first": 1.0, "last": 1.0}}


def _err(policy: str, key: str, value, accepted: str) -> ValueError:
    return ValueError(f"cache policy {policy!r}: {key}={value!r} is invalid; accepted: {accepted}")


def _check_int(policy: str, key: str, v, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _err(policy, key, v, f"an integer >= {lo}")
    return v


def _check_number(policy: str, key: str, v, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        rng = f"a number >= {lo:g}" if hi == math.inf else f"a number in [{lo:g}, {hi:g}]"
        raise _err(policy, key, v, rng)
    return float(v)


def _check_choice(policy: str, key: str, v, enum_or_choices):
    choices = list(enum_or_choices)
    if v not in choices:
        shown = [c.value if isinstance(c, Enum) else c for c in choices]
        raise _err(policy, key, v, f"one of {shown}")
    return enum_or_choices(v) if isinstance(enum_or_choices, type) else v


def _plain(v: Any) -> Any:
    """Enums -> their values, tuples -> lists, recursively (for describe())."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class CachePolicy:
    """Base of every policy. Registered policies are frozen dataclasses; the class attributes
    here are the defaults of the settings a policy may not have (no scorer: no token subsets;
    no stored dtype: features stored in the model's dtype)."""

    name: ClassVar[str] = "base"
    scorer: Optional[Scorer] = None
    stored_dtype: Optional[str] = None
    cfg_shared_selection: bool = False
    staleness_bonus: float = 0.0
    seed: int = 0
    warmup_steps: int = 0

    @property
    def forecast_order(self) -> int:
        """0: a reused feature is its last computed value; k: a Taylor forecast of order k."""
        return 0

    @property
    def forecast_distance(self) -> str:
        """The variable of the forecast: the step index ("step") or the timestep."""
        return "step"

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
        return {"type": self.name, **_plain(fields)}


def accepted_keys(cls) -> list:
    """The keyword arguments a registered policy class accepts (its dataclass fields)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cache policy class {cls.__name__} is not a dataclass; registered "
                        f"policies must be frozen dataclasses")
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _check_stored_dtype(policy: str, v):
    return _check_choice(policy, "stored_dtype", v, STORED_DTYPES)


def _check_forecast(policy: str, v) -> dict:
    """``forecast=dict(order=0|1|2, distance="step"|"timestep")`` -> the full dict."""
    if not isinstance(v, Mapping):
        raise _err(policy, "forecast", v, "dict(order=0|1|2, distance='step'|'timestep')")
    out = {"order": 0, "distance": "step"}
    for k, x in v.items():
        if k not in out:
            raise _err(policy, f"forecast.{k}", x, "keys ['distance', 'order']")
        out[k] = x
    order = _check_int(policy, "forecast.order", out["order"], 0)
    if order > MAX_ORDER:
        raise _err(policy, "forecast.order", order, f"an integer in [0, {MAX_ORDER}]")
    _check_choice(policy, "forecast.distance", out["distance"], DISTANCES)
    return out


class _Forecasting:
    """Mixin of the policies with a ``forecast`` field."""

    @property
    def forecast_order(self) -> int:
        return self.forecast["order"]

    @property
    def forecast_distance(self) -> str:
        return self.forecast["distance"]


def _forecast_field():
    return field(default_factory=lambda: {"order": 0, "distance": "step"})


@CACHES.register_module("none")
@dataclass(frozen=True)
class NoCache(CachePolicy):
    """Every step full; the patched model is bitwise identical to the unpatched one."""

    name: ClassVar[str] = "none"

    def plan(self, step, num_steps, timesteps):
        return FULL_STEP


_DUCA_CYCLES = {Kind.SPATIAL_ATTN: 3, Kind.TEMPORAL_ATTN: 3, Kind.CROSS_ATTN: 6, Kind.MLP: 3}
_PARTIAL_KINDS = (Kind.MLP, Kind.CROSS_ATTN)


@CACHES.register_module("DuCa")
@dataclass(frozen=True)
class DuCa(_Forecasting, CachePolicy):
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
    warmup_steps: int = 3
    cycles: Mapping[Kind, int] = field(default_factory=dict)
    tables: Mapping[Kind, Tuple[Entry, ...]] = field(default_factory=dict)
    fresh_ratio: float = 0.1
    ratio_factors: Mapping[Kind, float] = field(default_factory=dict)
    ratio_schedule: Mapping[str, Any] = field(default_factory=lambda: {"type": "constant"})
    scorer: Scorer = Scorer.VNORM
    staleness_bonus: float = 0.25
    cfg_shared_selection: bool = False
    stored_dtype: Optional[str] = None
    final_step: str = "plan"
    seed: int = 0
    forecast: Mapping[str, Any] = _forecast_field()

    # ---------------------------------------------------------------- validation
    def _default_entry(self, p: int) -> Entry:
        if p == 0:
            return Entry.FULL
        return Entry.AGGRESSIVE if p % 3 == 2 else Entry.CONSERVATIVE

    def _allowed_entries(self) -> tuple:
        return tuple(Entry)

    def _kind_map(self, key: str, value, check) -> Dict[Kind, Any]:
        if not isinstance(value, Mapping):
            raise _err(self.name, key, value, f"a dict with keys among {Kind.names()}")
        out = {}
        for k, v in value.items():
            if k not in Kind.names():
                raise _err(self.name, f"{key}.{k}", v, f"keys {Kind.names()}")
            out[Kind(k)] = check(f"{key}.{k}", v)
        return out

    def __post_init__(self):
        n, set_ = self.name, (lambda k, v: object.__setattr__(self, k, v))
        _check_int(n, "warmup_steps", self.warmup_steps, 0)
        cycles = dict(_DUCA_CYCLES)
        cycles.update(self._kind_map("cycles", self.cycles, lambda k, v: _check_int(n, k, v, 1)))
        set_("cycles", cycles)
        given = self._kind_map("tables", self.tables, lambda k, v: v)
        allowed = self._allowed_entries()
        tables = {}
        for k in Kind:
            c = cycles[k]
            table = given.get(k, [self._default_entry(p) for p in range(c)])
            ok = (isinstance(table, (list, tuple)) and len(table) == c
                  and all(e in [a.value for a in allowed] for e in table))
            if not ok:
                raise _err(n, f"tables.{k}", table, f"a list of {c} (cycles.{k}) entries among "
                           f"{[a.value for a in allowed]}")
            tables[k] = tuple(Entry(e) for e in table)
        set_("tables", tables)
        set_("fresh_ratio", _check_number(n, "fresh_ratio", self.fresh_ratio, 0.0, 1.0))
        factors = {Kind.MLP: 1.495, Kind.CROSS_ATTN: 1.0}
        for k, v in self._kind_map("ratio_factors", self.ratio_factors,
                                   lambda k, v: _check_number(n, k, v)).items():
            if k not in _PARTIAL_KINDS:
                raise _err(n, f"ratio_factors.{k}", v, f"keys {[str(x) for x in _PARTIAL_KINDS]}")
            factors[k] = v
        set_("ratio_factors", factors)
        set_("ratio_schedule", self._check_schedule(self.ratio_schedule))
        set_("scorer", _check_choice(n, "scorer", self.scorer, Scorer))
        set_("staleness_bonus", _check_number(n, "staleness_bonus", self.staleness_bonus))
        if not isinstance(self.cfg_shared_selection, bool):
            raise _err(n, "cfg_shared_selection", self.cfg_shared_selection, "True or False")
        _check_stored_dtype(n, self.stored_dtype)
        _check_choice(n, "final_step", self.final_step, ("plan", "full"))
        _check_int(n, "seed", self.seed, 0)
        set_("forecast", _check_forecast(n, self.forecast))

    def _check_schedule(self, cfg) -> dict:
        n = self.name
        if not isinstance(cfg, Mapping):
            raise _err(n, "ratio_schedule", cfg, "a dict(type=..., ...)")
        cfg = dict(cfg)
        typ = _check_choice(n, "ratio_schedule.type", cfg.pop("type", "constant"),
                            tuple(RATIO_SCHEDULES))
        allowed = RATIO_SCHEDULES[typ]
        for k, v in cfg.items():
            if k not in allowed:
                raise _err(n, f"ratio_schedule.{k}", v, f"keys {sorted(allowed)} for type {typ!r}")
            _check_number(n, f"ratio_schedule.{k}", v)
        return {"type": typ, **{k: float(v) for k, v in {**allowed, **cfg}.items()}}

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
            return s["decay"] ** step
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


@dataclass(frozen=True)
class _IntervalPolicy(_Forecasting, CachePolicy):
    """Full every ``interval`` steps after ``warmup_steps`` full steps; cached (reused, or with
    ``forecast=dict(order=k)`` forecast) in between."""

    interval: int = 2
    warmup_steps: int = 0
    stored_dtype: Optional[str] = None
    forecast: Mapping[str, Any] = _forecast_field()

    def __post_init__(self):
        _check_int(self.name, "interval", self.interval, 1)
        _check_int(self.name, "warmup_steps", self.warmup_steps, 0)
        _check_stored_dtype(self.name, self.stored_dtype)
        object.__setattr__(self, "forecast", _check_forecast(self.name, self.forecast))

    def computes(self, step: int) -> bool:
        return step < self.warmup_steps or (step - self.warmup_steps) % self.interval == 0


@CACHES.register_module("FORA")
@dataclass(frozen=True)
class FORA(_IntervalPolicy):
    """FORA: every block's self-attention, cross-attention and MLP outputs are computed every
    ``interval`` steps (default 3, after ``warmup_steps`` full steps) and reused (or forecast)
    in between."""

    name: ClassVar[str] = "FORA"
    interval: int = 3

    def plan(self, step, num_steps, timesteps):
        if self.computes(step):
            return FULL_STEP
        label = StepKind.FORECAST if self.forecast_order else StepKind.REUSE
        return StepPlan(actions={k: Action.REUSE for k in Kind}, label=label)

    def reuses(self, kind):
        return self.interval > 1


@CACHES.register_module("TrunkReuse")
@dataclass(frozen=True)
class TrunkReuse(_IntervalPolicy):
    """Aggressive-only caching: the trunk is computed every ``interval`` steps (default 2, after
    ``warmup_steps`` full steps) and its stored output replaces it in between."""

    name: ClassVar[str] = "TrunkReuse"

    def plan(self, step, num_steps, timesteps):
        return TRUNK_SKIP if self.skips_trunk_at(step, num_steps) else FULL_STEP

    def skips_trunk_at(self, step, num_steps, timesteps=()):
        return not self.computes(step)

    def skips_trunk(self):
        return self.interval > 1


@CACHES.register_module("TaylorSeer")
@dataclass(frozen=True)
class TaylorSeer(CachePolicy):
    """TaylorSeer (Liu et al. 2025): every block's self-attention, cross-attention and MLP are
    computed every ``interval`` steps after ``warmup_steps`` full steps and forecast in between
    by a Taylor polynomial of order ``order`` in the step distance (``distance="timestep"``:
    in the timestep). Defaults: the reference code's default mode (interval 5, order 2,
    3 full first steps). The same plan as ``FORA(interval, warmup_steps,
    forecast=dict(order=order))``."""

    name: ClassVar[str] = "TaylorSeer"
    interval: int = 5
    order: int = 2
    warmup_steps: int = 3
    distance: str = "step"
    stored_dtype: Optional[str] = None

    def __post_init__(self):
        n = self.name
        _check_int(n, "interval", self.interval, 1)
        _check_int(n, "warmup_steps", self.warmup_steps, 0)
        if not isinstance(self.order, int) or isinstance(self.order, bool) or \
                not 0 <= self.order <= MAX_ORDER:
            raise _err(n, "order", self.order, f"an integer in [0, {MAX_ORDER}]")
        _check_choice(n, "distance", self.distance, DISTANCES)
        _check_stored_dtype(n, self.stored_dtype)

    @property
    def forecast_order(self) -> int:
        return self.order

    @property
    def forecast_distance(self) -> str:
        return self.distance

    def plan(self, step, num_steps, timesteps):
        if step < self.warmup_steps or (step - self.warmup_steps) % self.interval == 0:
            return FULL_STEP
        return StepPlan(actions={k: Action.REUSE for k in Kind}, label=StepKind.FORECAST)

    def reuses(self, kind):
        return self.interval > 1


@CACHES.register_module("PAB")
@dataclass(frozen=True)
class PAB(CachePolicy):
    """Pyramid attention broadcast: inside the timestep window (lo, hi), spatial self-attention,
    temporal self-attention and cross-attention are computed once every ``spatial_range``,
    ``temporal_range`` and ``cross_range`` steps (counted from the run's first step in the
    window) and broadcast (reused) in between; MLPs always run. Open-Sora defaults 2 / 4 / 6 in
    (450, 930)."""

    name: ClassVar[str] = "PAB"
    spatial_range: int = 2
    temporal_range: int = 4
    cross_range: int = 6
    timestep_window: Tuple[float, float] = (450.0, 930.0)
    stored_dtype: Optional[str] = None

    def __post_init__(self):
        n = self.name
        for key in ("spatial_range", "temporal_range", "cross_range"):
            _check_int(n, key, getattr(self, key), 1)
        w = self.timestep_window
        ok = (isinstance(w, (list, tuple)) and len(w) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w)
              and w[0] < w[1])
        if not ok:
            raise _err(n, "timestep_window", w, "(lo, hi) with lo < hi")
        object.__setattr__(self, "timestep_window", (float(w[0]), float(w[1])))
        _check_stored_dtype(n, self.stored_dtype)

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


class AdaptivePolicy(CachePolicy):
    """Base of the policies that decide at run time, from a measured relative change, whether
    to compute the trunk from block ``decide_at`` on or to reuse that part's stored residual.

    ``measure`` names what is compared between steps: ``"modulated_input"`` (block 0's
    timestep-modulated, normalised input) or ``"first_pair_residual"`` (what the first spatial
    and temporal blocks add to the trunk input). ``reference_every_step``: the measure compares
    with the previous step (True) or with the last step that computed the trunk (False). The
    run state (accumulators, references) lives in the cache manager; ``decide`` reads and
    updates the ``state`` dict it is given."""

    measure: ClassVar[str] = "modulated_input"
    decide_at: ClassVar[int] = 0
    reference_every_step: ClassVar[bool] = True

    def plan(self, step, num_steps, timesteps):
        return StepPlan(decide_at=self.decide_at, label=StepKind.FULL)

    def skips_trunk(self):
        return True

    def skips_trunk_at(self, step, num_steps, timesteps=()):
        return False  # decided at run time; the residual, not the output, is stored

    def decide(self, step: int, num_steps: Optional[int], change: Optional[float],
               state: dict) -> bool:
        """True: compute the trunk from ``decide_at`` on. ``change`` is None when there is no
        reference yet (the run's first step)."""
        raise NotImplementedError

    def _forced(self, step: int, num_steps: Optional[int], change: Optional[float]) -> bool:
        last = num_steps is not None and step == num_steps - 1 and self.final_step == "full"
        return change is None or step < self.warmup_steps or last


def _load_calibration(policy: str, path: str) -> Tuple[Tuple[float, ...], Optional[tuple]]:
    if not isinstance(path, str) or not os.path.isfile(path):
        raise _err(policy, "calibration", path, "the path of a JSON file written by "
                   "tools/calibrate.py")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        coeffs = tuple(float(c) for c in data["coefficients"])
        rng = data.get("x_range")
        rng = None if rng is None else (float(rng[0]), float(rng[1]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise _err(policy, "calibration", path, f"a JSON file with a 'coefficients' list ({err})")
    if not coeffs:
        raise _err(policy, "calibration", path, "a non-empty 'coefficients' list")
    return coeffs, rng


@CACHES.register_module("TeaCache")
@dataclass(frozen=True)
class TeaCache(AdaptivePolicy):
    """TeaCache (Liu et al. 2024): the relative L1 change of the first block's
    timestep-modulated input from the previous step, rescaled by a polynomial fitted on the
    model in use, is accumulated over steps; while the sum stays under ``threshold`` the trunk
    is skipped and its stored residual (output minus input at the last computed step) added to
    the input; when it reaches the threshold the trunk is computed and the sum restarts.

    Args:
        threshold: accumulated rescaled change that forces a computation (0.1).
        calibration: path of the JSON that ``tools/calibrate.py`` writes (its ``coefficients``,
            highest degree first, and the measured input range ``x_range``); or
            ``coefficients`` (and optionally ``input_range``) given directly; neither: the raw
            change (the identity polynomial). The polynomial is evaluated with its input
            clamped to the calibrated range (a fitted polynomial is meaningless outside it) and
            its output clamped at 0 (a change is never negative).
        warmup_steps: steps always computed at the start (1); final_step: "full" computes
            the last step (as TeaCache does) or "plan".
        stored_dtype: None | fp32 | fp16 | bf16 | fp8 for the stored residual.
    """

    name: ClassVar[str] = "TeaCache"
    threshold: float = 0.1
    calibration: Optional[str] = None
    coefficients: Optional[Tuple[float, ...]] = None
    input_range: Optional[Tuple[float, float]] = None
    warmup_steps: int = 1
    final_step: str = "full"
    stored_dtype: Optional[str] = None

    def __post_init__(self):
        n = self.name
        _check_number(n, "threshold", self.threshold)
        coeffs, rng = self.coefficients, self.input_range
        if self.calibration is not None:
            loaded, loaded_rng = _load_calibration(n, self.calibration)
            for key, given, want in (("coefficients", coeffs, loaded),
                                     ("input_range", rng, loaded_rng)):
                if given is not None and tuple(given) != want:  # describe() gives all three
                    raise _err(n, key, given, "None when 'calibration' is set")
            coeffs, rng = loaded, loaded_rng
        elif coeffs is not None:
            if not isinstance(coeffs, (list, tuple)) or not coeffs:
                raise _err(n, "coefficients", coeffs, "a non-empty list of numbers")
            coeffs = tuple(_check_number(n, "coefficients", c, -math.inf) for c in coeffs)
        if rng is not None:
            ok = (isinstance(rng, (list, tuple)) and len(rng) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)
                  and rng[0] <= rng[1])
            if not ok:
                raise _err(n, "input_range", rng, "(lo, hi) with lo <= hi")
            rng = (float(rng[0]), float(rng[1]))
        object.__setattr__(self, "coefficients", coeffs)
        object.__setattr__(self, "input_range", rng)
        _check_int(n, "warmup_steps", self.warmup_steps, 0)
        _check_choice(n, "final_step", self.final_step, ("plan", "full"))
        _check_stored_dtype(n, self.stored_dtype)

    def rescale(self, change: float) -> float:
        if self.coefficients is None:
            return change
        if self.input_range is not None:
            change = min(max(change, self.input_range[0]), self.input_range[1])
        out = 0.0
        for c in self.coefficients:  # Horner, highest degree first
            out = out * change + c
        return max(out, 0.0)

    def decide(self, step, num_steps, change, state):
        if self._forced(step, num_steps, change):
            state["accumulated"] = 0.0
            return True
        state["accumulated"] = state.get("accumulated", 0.0) + self.rescale(change)
        if state["accumulated"] < self.threshold:
            return False
        state["accumulated"] = 0.0
        return True


@CACHES.register_module("FirstBlockCache")
@dataclass(frozen=True)
class FirstBlockCache(AdaptivePolicy):
    """First-Block Cache (ParaAttention, diffusers): the first spatial and temporal blocks are
    always computed; while what they add to the trunk input changes, relative to the last step
    that computed the whole trunk, by less than ``threshold`` (relative L1), the other blocks
    are skipped and their stored residual is added.

    Args: threshold (0.05), warmup_steps (1), final_step ("plan" | "full"), stored_dtype."""

    name: ClassVar[str] = "FirstBlockCache"
    measure: ClassVar[str] = "first_pair_residual"
    decide_at: ClassVar[int] = 2
    reference_every_step: ClassVar[bool] = False
    threshold: float = 0.05
    warmup_steps: int = 1
    final_step: str = "plan"
    stored_dtype: Optional[str] = None

    def __post_init__(self):
        n = self.name
        _check_number(n, "threshold", self.threshold)
        _check_int(n, "warmup_steps", self.warmup_steps, 0)
        _check_choice(n, "final_step", self.final_step, ("plan", "full"))
        _check_stored_dtype(n, self.stored_dtype)

    def decide(self, step, num_steps, change, state):
        return self._forced(step, num_steps, change) or change >= self.threshold
