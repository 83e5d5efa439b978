"""The DuCa cache plugin: policies (frozen dataclasses registered in CACHES), token selection,
stored features, the cache-aware block runner and the manager. Entry points:
:func:`apply_cache`, :func:`remove_cache`; ``dict(type="DuCa", model=..., cache=...)`` wraps a
model config (:mod:`.wrapper`)."""
from .manager import CacheManager, apply_cache, get_cache_manager, remove_cache
from .plan import FULL_STEP, KINDS, TRUNK_SKIP, Action, Kind, StepKind, StepPlan
from .policies import (
                       FORA,
                       PAB,
                       CachePolicy,
                       DuCa,
                       Entry,
                       FirstBlockCache,
                       NoCache,
                       Scorer,
                       TaylorSeer,
                       TeaCache,
                       ToCa,
                       TrunkReuse,
                       build_policy,
)
from .wrapper import build_cached

__all__ = ["CacheManager", "apply_cache", "build_policy", "get_cache_manager", "remove_cache",
           "FULL_STEP", "KINDS", "TRUNK_SKIP", "Action", "Kind", "StepKind", "StepPlan",
           "FORA", "PAB", "CachePolicy", "DuCa", "Entry", "NoCache", "Scorer", "TaylorSeer",
           "TeaCache", "FirstBlockCache", "ToCa", "TrunkReuse", "build_cached"]
