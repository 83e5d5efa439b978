"""What a policy says for one denoising step: per module kind, full / reuse / partial, or skip
the whole trunk (aggressive caching)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

SPATIAL_ATTN, TEMPORAL_ATTN, CROSS_ATTN, MLP = "spatial_attn", "temporal_attn", "cross_attn", "mlp"
KINDS = (SPATIAL_ATTN, TEMPORAL_ATTN, CROSS_ATTN, MLP)

FULL, REUSE, PARTIAL = "full", "reuse", "partial"
ACTIONS = (FULL, REUSE, PARTIAL)


@dataclass(frozen=True)
class StepPlan:
    """``actions[kind]`` is FULL, REUSE or PARTIAL; ``ratios[kind]`` the fraction of tokens a
    PARTIAL module recomputes; ``skip_trunk`` replaces the whole trunk by its stored output;
    ``label`` names the step kind in statistics."""

    actions: Dict[str, str] = field(default_factory=lambda: {k: FULL for k in KINDS})
    ratios: Dict[str, float] = field(default_factory=dict)
    skip_trunk: bool = False
    label: str = "full"

    @property
    def computes_trunk(self) -> bool:
        return not self.skip_trunk

    def is_full(self) -> bool:
        return not self.skip_trunk and all(a == FULL for a in self.actions.values())


FULL_STEP = StepPlan()
TRUNK_SKIP = StepPlan(actions={k: REUSE for k in KINDS}, skip_trunk=True, label="aggressive")
