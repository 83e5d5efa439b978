"""What one block keeps between steps, and the byte accounting of everything stored."""
from __future__ import annotations

from typing import Dict, Optional

import torch


class StoredBytes:
    """Running total and peak of the bytes held by stored features."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def swap(self, old: Optional[torch.Tensor], new: Optional[torch.Tensor]) -> None:
        if old is not None:
            self.current -= old.numel() * old.element_size()
        if new is not None:
            self.current += new.numel() * new.element_size()
        self.peak = max(self.peak, self.current)


class BlockState:
    """Stored features of one block: module outputs (self-attention before its gate,
    cross-attention, MLP before its gate) as [B, T, S_local, C]; the token score of the last
    fully computed self-attention [B, N]; per kind, the step at which each token was last
    recomputed [B, N]; the block input at the last full MLP (similarity scorer)."""

    FEATURES = ("attn", "cross", "mlp", "score", "x_ref")

    def __init__(self, counter: StoredBytes):
        self._counter = counter
        self.attn: Optional[torch.Tensor] = None
        self.cross: Optional[torch.Tensor] = None
        self.mlp: Optional[torch.Tensor] = None
        self.score: Optional[torch.Tensor] = None
        self.x_ref: Optional[torch.Tensor] = None
        self.last_step: Dict[str, torch.Tensor] = {}

    def put(self, name: str, value: Optional[torch.Tensor]) -> None:
        self._counter.swap(getattr(self, name), value)
        setattr(self, name, value)

    def clear(self) -> None:
        for name in self.FEATURES:
            self.put(name, None)
        self.last_step = {}
