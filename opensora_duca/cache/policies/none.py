"""Policy ``none``: every step full."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...registry import CACHES
from ..plan import FULL_STEP
from .base import CachePolicy


@CACHES.register_module("none")
@dataclass(frozen=True)
class NoCache(CachePolicy):
    """Every step full; the patched model is bitwise identical to the unpatched one."""

    name: ClassVar[str] = "none"

    def plan(self, step, num_steps, timesteps):
        return FULL_STEP


__all__ = ["NoCache"]
