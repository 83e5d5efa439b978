"""Cache policies, registered in CACHES: ``none``, ``DuCa``, ``ToCa``, ``FORA``, ``PAB`` and
``TrunkReuse`` (aggressive-only), ``TaylorSeer`` (forecasting), and the adaptive ``TeaCache``
and ``FirstBlockCache``, ``MagCache`` (calibrated magnitude ratios), ``EasyCache`` (online
transformation rate) and ``SpeCa`` (a verified forecast), ``VerifiedDuCa`` (DuCa with
forecasting and a checked aggressive step); ``forecast=`` adds forecasting (Taylor
or bdf2) to DuCa, ToCa, FORA and TrunkReuse.

One module per family: :mod:`.base` (what a policy answers), :mod:`.fields` (validation
declared per field), :mod:`.none`, :mod:`.duca` (DuCa, ToCa), :mod:`.interval` (FORA,
TrunkReuse, TaylorSeer), :mod:`.pab`, :mod:`.adaptive` (TeaCache, FirstBlockCache) and
:mod:`.scorers` (the token scorers' names).

Each policy's configuration is one frozen dataclass validated in ``__post_init__`` (so
``DuCa(fresh_ratio=0.2)`` and ``dict(type="DuCa", fresh_ratio=0.2)`` are the same thing, and a
bad value fails when the config is built: :func:`build_policy`). A fixed-plan policy maps a step
index, the run's number of steps and the timesteps seen so far in the run to a
:class:`~opensora_duca.cache.plan.StepPlan`; it holds no run state, so plans are deterministic
and every sequence-parallel rank computes the same plan with no communication. An adaptive
policy's run state is the small object its ``new_state()`` returns.
"""
from __future__ import annotations

from typing import Any

from ...registry import CACHES, build_module, registered
from ...utils.config import plain
from .adaptive import (
    AdaptivePolicy,
    AdaptiveState,
    EasyCache,
    FirstBlockCache,
    MagCache,
    SpeCa,
    TeaCache,
    TeaCacheState,
)
from .base import CachePolicy, Forecasting, accepted_keys
from .duca import RATIO_SCHEDULES, DuCa, Entry, ToCa, VerifiedDuCa
from .fields import DISTANCES, MAX_ORDER, STORED_DTYPES
from .interval import FORA, IntervalPolicy, TaylorSeer, TrunkReuse
from .none import NoCache
from .pab import PAB
from .scorers import Scorer


def build_policy(cfg: Any) -> CachePolicy:
    """A policy object from ``dict(type=...)`` (validated), a policy object, or None -> none."""
    if cfg is None:
        return NoCache()
    if isinstance(cfg, CachePolicy):
        return cfg
    cfg = plain(cfg)
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"cache config {cfg!r} must be a dict with a 'type' key; registered "
                         f"policies: {registered(CACHES)}")
    typ = cfg["type"]
    names = registered(CACHES)
    if typ not in names:
        raise KeyError(f"unknown cache policy type {typ!r}; registered policies: {names}")
    accepted = accepted_keys(CACHES.get(typ))
    for k in cfg:
        if k != "type" and k not in accepted:
            raise ValueError(f"cache policy {typ!r}: unknown key {k!r}={cfg[k]!r}; "
                             f"accepted keys: {sorted(accepted)}")
    return build_module(cfg, CACHES)


__all__ = ["build_policy", "accepted_keys", "CachePolicy", "Forecasting", "AdaptivePolicy",
           "AdaptiveState", "TeaCacheState", "NoCache", "DuCa", "ToCa", "Entry", "FORA",
           "VerifiedDuCa", "TrunkReuse", "TaylorSeer", "IntervalPolicy", "PAB", "TeaCache",
           "FirstBlockCache",
           "MagCache", "EasyCache", "SpeCa",
           "Scorer", "STORED_DTYPES", "DISTANCES", "MAX_ORDER", "RATIO_SCHEDULES"]
