"""Cache policies, registered in CACHES: ``none``, ``DuCa``, ``ToCa``, ``FORA``, ``PAB`` and
``TrunkReuse`` (aggressive-only). A policy maps a step index (and, for PAB, the timestep) to a
:class:`StepPlan`; plans are deterministic, so every sequence-parallel rank computes the same
plan with no communication.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..registry import CACHES
from .plan import (CROSS_ATTN, FULL, FULL_STEP, KINDS, MLP, PARTIAL, REUSE, SPATIAL_ATTN,
                   TEMPORAL_ATTN, TRUNK_SKIP, StepPlan)

STORED_DTYPES = (None, "fp32", "fp16", "bf16")
SCORERS = ("vnorm", "random", "attention", "similarity", "norm")
CONSERVATIVE, AGGRESSIVE = "conservative", "aggressive"
TABLE_ENTRIES = (FULL, CONSERVATIVE, AGGRESSIVE)


def _err(policy: str, key: str, value, accepted: str) -> ValueError:
    return ValueError(f"cache policy {policy!r}: {key}={value!r} is invalid; accepted: {accepted}")


class CachePolicy:
    """Base class. Subclasses set ``name`` and implement :meth:`plan`."""

    name = "base"
    scorer: Optional[str] = None
    stored_dtype: Optional[str] = None
    cfg_shared_selection = False
    staleness_bonus = 0.0
    seed = 0
    min_steps = 1

    def plan(self, step: int, num_steps: Optional[int], timestep: float) -> StepPlan:
        raise NotImplementedError

    def reuses(self, kind: str) -> bool:
        """Whether any plan of this policy can reuse/partially recompute ``kind``."""
        return False

    def skips_trunk(self) -> bool:
        return False

    def validate_run(self, num_steps: int) -> None:
        if num_steps < self.min_steps:
            raise ValueError(f"cache policy {self.name!r} needs at least {self.min_steps} "
                             f"sampling steps; the run has num_steps={num_steps}")

    def describe(self) -> dict:
        return {"type": self.name}


@CACHES.register_module("none")
class NoCache(CachePolicy):
    """Every step full; the patched model is bitwise identical to the unpatched one."""

    name = "none"

    def plan(self, step, num_steps, timestep):
        return FULL_STEP


def _check_ratio(policy, key, v):
    if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise _err(policy, key, v, "a number in [0, 1]")
    return float(v)


def _check_int(policy, key, v, lo):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _err(policy, key, v, f"an integer >= {lo}")
    return v


def _common(policy: str, scorer, stored_dtype, staleness_bonus, cfg_shared_selection, seed):
    if scorer not in SCORERS:
        raise _err(policy, "scorer", scorer, f"one of {list(SCORERS)}")
    if stored_dtype not in STORED_DTYPES:
        raise _err(policy, "stored_dtype", stored_dtype, f"one of {list(STORED_DTYPES)}")
    if not isinstance(staleness_bonus, (int, float)) or staleness_bonus < 0:
        raise _err(policy, "staleness_bonus", staleness_bonus, "a number >= 0")
    if not isinstance(cfg_shared_selection, bool):
        raise _err(policy, "cfg_shared_selection", cfg_shared_selection, "True or False")
    _check_int(policy, "seed", seed, 0)


RATIO_SCHEDULES = ("constant", "linear", "exp", "layerwise")


class RatioSchedule:
    """Fresh-ratio schedule. ``constant``; ``linear``: factor goes from ``start`` (step 0) to
    ``end`` (last step); ``exp``: factor ``decay ** step``; ``layerwise``: factor goes from
    ``first`` (block 0) to ``last`` (last block). The result is clipped to [0, 1]."""

    def __init__(self, policy: str, cfg: Optional[dict]):
        cfg = dict(cfg or {"type": "constant"})
        self.type = cfg.pop("type", "constant")
        if self.type not in RATIO_SCHEDULES:
            raise _err(policy, "ratio_schedule.type", self.type, f"one of {list(RATIO_SCHEDULES)}")
        allowed = {"constant": {}, "linear": {"start": 1.0, "end": 1.0},
                   "exp": {"decay": 1.0}, "layerwise": {"first": 1.0, "last": 1.0}}[self.type]
        for k in cfg:
            if k not in allowed:
                raise _err(policy, f"ratio_schedule.{k}", cfg[k],
                           f"keys {sorted(allowed)} for type {self.type!r}")
        self.params = {**allowed, **cfg}
        for k, v in self.params.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise _err(policy, f"ratio_schedule.{k}", v, "a number >= 0")

    @property
    def per_layer(self) -> bool:
        return self.type == "layerwise"

    def factor(self, step: int, num_steps: Optional[int], layer: int = 0, depth: int = 1) -> float:
        p = self.params
        if self.type == "linear":
            frac = step / max((num_steps or step + 1) - 1, 1)
            return p["start"] + (p["end"] - p["start"]) * frac
        if self.type == "exp":
            return p["decay"] ** step
        if self.type == "layerwise":
            return p["first"] + (p["last"] - p["first"]) * (layer / max(depth - 1, 1))
        return 1.0


@CACHES.register_module("DuCa")
class DuCa(CachePolicy):
    """Dual feature caching (DuCa). Defaults reproduce the released Open-Sora preset.

    Args:
        warmup_steps: steps 0..warmup_steps-1 are fully computed (default 3).
        cycles: cycle length per module kind (spatial_attn 3, temporal_attn 3, cross_attn 6,
            mlp 3). For step s >= warmup_steps the entry ``tables[kind][s % cycle]`` applies.
        tables: per kind, a list of ``cycle`` entries among full / conservative / aggressive.
            Default: position 0 full, every position p with p % 3 == 2 aggressive, the others
            conservative (this gives the released tables F C A and F C A C C A).
        fresh_ratio: base fraction of tokens a conservative MLP recomputes (0.1).
        ratio_factors: per-kind multipliers of fresh_ratio (mlp 1.495).
        ratio_schedule: dict(type=constant | linear | exp | layerwise, ...), see RatioSchedule.
        scorer: vnorm | random | attention | similarity | norm (default vnorm).
        staleness_bonus: lambda of score += lambda * c / 3 (0.25).
        cfg_shared_selection: one token selection shared by the conditional and unconditional
            halves of the CFG batch (False: each sample selects its own, as the released code).
        stored_dtype: None (model dtype) | fp32 | fp16 | bf16.
        final_step: "plan" (follow the cycle, as released) or "full" (compute the last step).
        seed: seed of the random scorer.
    What the entries do: full computes a module and stores it; conservative reuses self- and
    cross-attention outputs and recomputes a token subset of the MLP; aggressive skips the
    whole trunk when every kind is aggressive at that step (otherwise the module is reused).
    """

    name = "DuCa"
    default_cycles = {SPATIAL_ATTN: 3, TEMPORAL_ATTN: 3, CROSS_ATTN: 6, MLP: 3}
    aggressive_entry = AGGRESSIVE

    def __init__(self, warmup_steps: int = 3, cycles: Optional[Dict[str, int]] = None,
                 tables: Optional[Dict[str, Sequence[str]]] = None, fresh_ratio: float = 0.1,
                 ratio_factors: Optional[Dict[str, float]] = None,
                 ratio_schedule: Optional[dict] = None, scorer: str = "vnorm",
                 staleness_bonus: float = 0.25, cfg_shared_selection: bool = False,
                 stored_dtype: Optional[str] = None, final_step: str = "plan", seed: int = 0):
        n = self.name
        self.warmup_steps = _check_int(n, "warmup_steps", warmup_steps, 0)
        self.min_steps = max(1, self.warmup_steps)
        self.cycles = dict(self.default_cycles)
        for k, v in (cycles or {}).items():
            if k not in KINDS:
                raise _err(n, f"cycles.{k}", v, f"keys {list(KINDS)}")
            self.cycles[k] = _check_int(n, f"cycles.{k}", v, 1)
        self.tables: Dict[str, List[str]] = {}
        for k in KINDS:
            c = self.cycles[k]
            default = [FULL] + [AGGRESSIVE if p % 3 == 2 else CONSERVATIVE for p in range(1, c)]
            default = [self._map_entry(e) for e in default]
            table = list((tables or {}).get(k, default))
            if len(table) != c or any(e not in TABLE_ENTRIES for e in table):
                raise _err(n, f"tables.{k}", table,
                           f"a list of {c} (cycles.{k}) entries among {list(TABLE_ENTRIES)}")
            self.tables[k] = table
        for k in (tables or {}):
            if k not in KINDS:
                raise _err(n, f"tables.{k}", tables[k], f"keys {list(KINDS)}")
        self.fresh_ratio = _check_ratio(n, "fresh_ratio", fresh_ratio)
        self.ratio_factors = {MLP: 1.495, CROSS_ATTN: 1.0}
        for k, v in (ratio_factors or {}).items():
            if k not in (MLP, CROSS_ATTN):
                raise _err(n, f"ratio_factors.{k}", v, f"keys {[MLP, CROSS_ATTN]}")
            if not isinstance(v, (int, float)) or v < 0:
                raise _err(n, f"ratio_factors.{k}", v, "a number >= 0")
            self.ratio_factors[k] = float(v)
        self.ratio_schedule = RatioSchedule(n, ratio_schedule)
        _common(n, scorer, stored_dtype, staleness_bonus, cfg_shared_selection, seed)
        self.scorer, self.stored_dtype, self.seed = scorer, stored_dtype, seed
        self.staleness_bonus = float(staleness_bonus)
        self.cfg_shared_selection = cfg_shared_selection
        if final_step not in ("plan", "full"):
            raise _err(n, "final_step", final_step, "'plan' or 'full'")
        self.final_step = final_step

    @staticmethod
    def _map_entry(entry: str) -> str:
        return entry

    def _conservative(self, kind: str) -> str:
        return PARTIAL if kind == MLP else REUSE

    def plan(self, step, num_steps, timestep):
        if step < self.warmup_steps:
            return FULL_STEP
        if self.final_step == "full" and num_steps is not None and step == num_steps - 1:
            return FULL_STEP
        entries = {k: self.tables[k][step % self.cycles[k]] for k in KINDS}
        if all(e == AGGRESSIVE for e in entries.values()):
            return TRUNK_SKIP
        actions, ratios = {}, {}
        for k, e in entries.items():
            if e == FULL:
                actions[k] = FULL
            elif e == CONSERVATIVE:
                actions[k] = self._conservative(k)
                if actions[k] == PARTIAL:
                    ratios[k] = min(1.0, self.fresh_ratio * self.ratio_factors[k]
                                    * self.ratio_schedule.factor(step, num_steps))
            else:  # aggressive entry on a step that still computes the trunk: reuse the module
                actions[k] = REUSE
        if all(a == FULL for a in actions.values()):
            label = "full"
        elif all(actions[k] == FULL for k in (SPATIAL_ATTN, TEMPORAL_ATTN, MLP)):
            label = "full (cross-attn reused)"
        else:
            label = "conservative"
        return StepPlan(actions=actions, ratios=ratios, label=label)

    def reuses(self, kind):
        return any(e != FULL for e in self.tables[kind])

    def skips_trunk(self):
        return any(all(self.tables[k][s % self.cycles[k]] == AGGRESSIVE for k in KINDS)
                   for s in range(max(self.cycles.values()) * 6))

    def describe(self):
        return {"type": self.name, "warmup_steps": self.warmup_steps, "cycles": self.cycles,
                "fresh_ratio": self.fresh_ratio, "ratio_factors": self.ratio_factors,
                "ratio_schedule": {"type": self.ratio_schedule.type, **self.ratio_schedule.params},
                "scorer": self.scorer, "staleness_bonus": self.staleness_bonus,
                "cfg_shared_selection": self.cfg_shared_selection,
                "stored_dtype": self.stored_dtype, "final_step": self.final_step}


@CACHES.register_module("ToCa")
class ToCa(DuCa):
    """Token-wise caching (ToCa) in the same harness: the DuCa preset with a conservative step
    wherever DuCa has an aggressive one (all other fields as DuCa). ToCa's own attention-map
    scorer is ``scorer="attention"`` (needs the ``math`` attention backend)."""

    name = "ToCa"

    def __init__(self, tables=None, **kwargs):
        if tables is not None:
            for k, t in tables.items():
                if AGGRESSIVE in list(t):
                    raise _err("ToCa", f"tables.{k}", t, f"entries among {[FULL, CONSERVATIVE]}"
                               " (ToCa has no aggressive steps; use DuCa)")
        super().__init__(tables=tables, **kwargs)

    @staticmethod
    def _map_entry(entry):
        return CONSERVATIVE if entry == AGGRESSIVE else entry


class _IntervalPolicy(CachePolicy):
    """Full every ``interval`` steps after ``warmup_steps`` full steps; cached in between."""

    default_interval = 2

    def __init__(self, interval: Optional[int] = None, warmup_steps: int = 0, stored_dtype=None):
        interval = self.default_interval if interval is None else interval
        self.interval = _check_int(self.name, "interval", interval, 1)
        self.warmup_steps = _check_int(self.name, "warmup_steps", warmup_steps, 0)
        self.min_steps = max(1, self.warmup_steps)
        if stored_dtype not in STORED_DTYPES:
            raise _err(self.name, "stored_dtype", stored_dtype, f"one of {list(STORED_DTYPES)}")
        self.stored_dtype = stored_dtype

    def computes(self, step: int) -> bool:
        return step < self.warmup_steps or (step - self.warmup_steps) % self.interval == 0

    def describe(self):
        return {"type": self.name, "interval": self.interval, "warmup_steps": self.warmup_steps,
                "stored_dtype": self.stored_dtype}


@CACHES.register_module("FORA")
class FORA(_IntervalPolicy):
    """FORA: every block's self-attention, cross-attention and MLP outputs are computed every
    ``interval`` steps (default 3, after ``warmup_steps`` full steps) and reused in between."""

    name = "FORA"
    default_interval = 3

    def plan(self, step, num_steps, timestep):
        if self.computes(step):
            return FULL_STEP
        return StepPlan(actions={k: REUSE for k in KINDS}, label="reuse")

    def reuses(self, kind):
        return self.interval > 1


@CACHES.register_module("PAB")
class PAB(CachePolicy):
    """Pyramid attention broadcast: inside the timestep window (lo, hi), spatial self-attention,
    temporal self-attention and cross-attention are computed once every ``spatial_range``,
    ``temporal_range`` and ``cross_range`` steps (counted from the first step in the window)
    and broadcast (reused) in between; MLPs always run. Open-Sora defaults 2 / 4 / 6 in
    (450, 930)."""

    name = "PAB"

    def __init__(self, spatial_range: int = 2, temporal_range: int = 4, cross_range: int = 6,
                 timestep_window: Sequence[float] = (450, 930), stored_dtype=None):
        n = self.name
        self.ranges = {SPATIAL_ATTN: _check_int(n, "spatial_range", spatial_range, 1),
                       TEMPORAL_ATTN: _check_int(n, "temporal_range", temporal_range, 1),
                       CROSS_ATTN: _check_int(n, "cross_range", cross_range, 1)}
        w = list(timestep_window)
        if len(w) != 2 or not all(isinstance(v, (int, float)) for v in w) or not w[0] < w[1]:
            raise _err(n, "timestep_window", timestep_window, "(lo, hi) with lo < hi")
        self.window = (float(w[0]), float(w[1]))
        if stored_dtype not in STORED_DTYPES:
            raise _err(n, "stored_dtype", stored_dtype, f"one of {list(STORED_DTYPES)}")
        self.stored_dtype = stored_dtype
        self._first_in_window: Optional[int] = None

    def reset(self):
        self._first_in_window = None

    def plan(self, step, num_steps, timestep):
        lo, hi = self.window
        if not lo < timestep < hi:
            return FULL_STEP
        if self._first_in_window is None or step < self._first_in_window:
            self._first_in_window = step
        j = step - self._first_in_window
        actions = {k: (FULL if j % r == 0 else REUSE) for k, r in self.ranges.items()}
        actions[MLP] = FULL
        label = "full" if all(a == FULL for a in actions.values()) else "broadcast"
        return StepPlan(actions=actions, label=label)

    def reuses(self, kind):
        return kind != MLP and self.ranges[kind] > 1

    def describe(self):
        return {"type": self.name, "spatial_range": self.ranges[SPATIAL_ATTN],
                "temporal_range": self.ranges[TEMPORAL_ATTN],
                "cross_range": self.ranges[CROSS_ATTN], "timestep_window": list(self.window),
                "stored_dtype": self.stored_dtype}


@CACHES.register_module("TrunkReuse")
class TrunkReuse(_IntervalPolicy):
    """Aggressive-only caching: the trunk is computed every ``interval`` steps (default 2, after
    ``warmup_steps`` full steps) and its stored output replaces it in between."""

    name = "TrunkReuse"

    def plan(self, step, num_steps, timestep):
        return FULL_STEP if self.computes(step) else TRUNK_SKIP

    def skips_trunk(self):
        return self.interval > 1
