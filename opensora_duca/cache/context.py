"""What a block runner reads of its step and writes back: the contract between the cache
manager, which provides it, and the runner and layouts, which use it (typing only: nothing here
runs, and neither side imports the other)."""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple

import torch


class StepContext(Protocol):
    """The manager as a block runner sees it, within one model call."""

    plan: Any                 # this step's StepPlan (None outside a tracked call)
    policy: Any               # the CachePolicy
    layout: Any               # the model family's layout adapter
    regions: Any              # the (compiled) per-block functions
    counts: Any               # CacheStats: module actions, partial tokens, host time
    adaptive: Any             # AdaptiveRun: residuals, decision groups, rows of the step
    batch_part: Tuple[int, int]
    depth: int
    check_pending: bool       # VerifiedDuCa: this step's first token subset is checked

    @property
    def step(self) -> int: ...

    @property
    def num_steps(self) -> Optional[int]: ...

    @property
    def at(self) -> float: ...

    @property
    def shape(self) -> Any: ...

    def grid_for(self, n_local: int) -> Any: ...

    def stores(self, kind) -> bool: ...

    def stores_modules(self) -> bool: ...

    def uses_selection(self, kind) -> bool: ...

    def needs_scores(self) -> bool: ...

    def decide(self, slot, x: torch.Tensor, bound: dict) -> Any: ...

    def trunk_output(self, x: torch.Tensor) -> torch.Tensor: ...

    def check_forecast(self, forecast: torch.Tensor, idx: torch.Tensor,
                       exact: torch.Tensor) -> None: ...

    def after_block(self, slot, out: torch.Tensor) -> None: ...
